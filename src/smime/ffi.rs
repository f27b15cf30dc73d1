//! The few OpenSSL CMS calls that the `openssl` crate does not wrap.
//!
//! Everything `unsafe` about CMS lives here, behind small safe functions:
//! reading the signer certificates and the digest algorithm of a SignedData,
//! adding recipients with RSA-OAEP key transport, finding which recipient a
//! certificate is, and naming the key transport algorithm of a recipient.

use foreign_types::{ForeignType, ForeignTypeRef};
use openssl::cms::CmsContentInfo;
use openssl::error::ErrorStack;
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{HasPrivate, PKeyRef};
use openssl::stack::StackRef;
use openssl::symm::Cipher;
use openssl::x509::{X509Ref, X509};
use openssl_sys as sys;
use std::os::raw::{c_int, c_uint, c_void};
use std::ptr;

#[allow(non_camel_case_types)]
type CMS_SignerInfo = c_void;
#[allow(non_camel_case_types)]
type CMS_RecipientInfo = c_void;

extern "C" {
    fn CMS_get0_signers(cms: *mut sys::CMS_ContentInfo) -> *mut sys::OPENSSL_STACK;
    fn CMS_get0_SignerInfos(cms: *mut sys::CMS_ContentInfo) -> *mut sys::OPENSSL_STACK;
    fn CMS_SignerInfo_get0_algs(
        si: *mut CMS_SignerInfo,
        pk: *mut *mut sys::EVP_PKEY,
        signer: *mut *mut sys::X509,
        pdig: *mut *mut sys::X509_ALGOR,
        psig: *mut *mut sys::X509_ALGOR,
    );
    fn CMS_add1_signer(
        cms: *mut sys::CMS_ContentInfo,
        signer: *mut sys::X509,
        pk: *mut sys::EVP_PKEY,
        md: *const sys::EVP_MD,
        flags: c_uint,
    ) -> *mut CMS_SignerInfo;
    fn CMS_add1_recipient_cert(
        cms: *mut sys::CMS_ContentInfo,
        recip: *mut sys::X509,
        flags: c_uint,
    ) -> *mut CMS_RecipientInfo;
    fn CMS_RecipientInfo_get0_pkey_ctx(ri: *mut CMS_RecipientInfo) -> *mut sys::EVP_PKEY_CTX;
    fn CMS_final(
        cms: *mut sys::CMS_ContentInfo,
        data: *mut sys::BIO,
        dcont: *mut sys::BIO,
        flags: c_uint,
    ) -> c_int;
    fn CMS_get0_RecipientInfos(cms: *mut sys::CMS_ContentInfo) -> *mut sys::OPENSSL_STACK;
    fn CMS_RecipientInfo_type(ri: *mut CMS_RecipientInfo) -> c_int;
    fn CMS_RecipientInfo_ktri_cert_cmp(ri: *mut CMS_RecipientInfo, cert: *mut sys::X509) -> c_int;
    fn CMS_RecipientInfo_ktri_get0_algs(
        ri: *mut CMS_RecipientInfo,
        pk: *mut *mut sys::EVP_PKEY,
        recip: *mut *mut sys::X509,
        palg: *mut *mut sys::X509_ALGOR,
    ) -> c_int;
    fn CMS_get0_type(cms: *const sys::CMS_ContentInfo) -> *const sys::ASN1_OBJECT;
    fn CMS_get1_certs(cms: *mut sys::CMS_ContentInfo) -> *mut sys::OPENSSL_STACK;
    fn BIO_new_mem_buf(buf: *const c_void, len: c_int) -> *mut sys::BIO;
}

const CMS_RECIPINFO_TRANS: c_int = 0;
const RSA_PKCS1_OAEP_PADDING: c_int = 4;

/// Frees a BIO when dropped.
struct MemBio(*mut sys::BIO);

impl MemBio {
    fn new(data: &[u8]) -> Result<MemBio, ErrorStack> {
        let len = c_int::try_from(data.len()).map_err(|_| ErrorStack::get())?;
        // SAFETY: the buffer outlives the BIO, which only reads it.
        let bio = unsafe { BIO_new_mem_buf(data.as_ptr() as *const c_void, len) };
        if bio.is_null() {
            return Err(ErrorStack::get());
        }
        Ok(MemBio(bio))
    }
}

impl Drop for MemBio {
    fn drop(&mut self) {
        // SAFETY: we own the BIO.
        unsafe {
            sys::BIO_free_all(self.0);
        }
    }
}

fn nid_of_object(obj: *const sys::ASN1_OBJECT) -> Nid {
    if obj.is_null() {
        return Nid::UNDEF;
    }
    // SAFETY: obj is a valid ASN1_OBJECT owned by the caller's structure.
    Nid::from_raw(unsafe { sys::OBJ_obj2nid(obj) })
}

fn nid_of_algor(alg: *mut sys::X509_ALGOR) -> Nid {
    if alg.is_null() {
        return Nid::UNDEF;
    }
    let mut obj: *const sys::ASN1_OBJECT = ptr::null();
    // SAFETY: alg is valid; X509_ALGOR_get0 only writes the out pointers we pass.
    unsafe {
        sys::X509_ALGOR_get0(&mut obj, ptr::null_mut(), ptr::null_mut(), alg);
    }
    nid_of_object(obj)
}

/// Iterates the raw members of an OpenSSL stack.
fn stack_members(stack: *mut sys::OPENSSL_STACK) -> Vec<*mut c_void> {
    if stack.is_null() {
        return Vec::new();
    }
    // SAFETY: stack is a valid OPENSSL_STACK.
    let n = unsafe { sys::OPENSSL_sk_num(stack) };
    (0..n.max(0))
        .map(|i| unsafe { sys::OPENSSL_sk_value(stack, i) })
        .collect()
}

/// The content type of a ContentInfo (e.g. `pkcs7-envelopedData`, `id-smime-ct-authEnvelopedData`).
pub fn content_type(cms: &CmsContentInfo) -> Nid {
    // SAFETY: cms is valid for the call.
    nid_of_object(unsafe { CMS_get0_type(cms.as_ptr()) })
}

/// Digest and signature algorithms of each SignerInfo, in order.
pub fn signer_algorithms(cms: &CmsContentInfo) -> Vec<(Nid, Nid)> {
    // SAFETY: returns an internal stack (or null for non-SignedData), not owned by us.
    let infos = unsafe { CMS_get0_SignerInfos(cms.as_ptr()) };
    stack_members(infos)
        .into_iter()
        .map(|si| {
            let mut dig: *mut sys::X509_ALGOR = ptr::null_mut();
            let mut sig: *mut sys::X509_ALGOR = ptr::null_mut();
            // SAFETY: si is a member of the SignerInfos stack.
            unsafe {
                CMS_SignerInfo_get0_algs(si, ptr::null_mut(), ptr::null_mut(), &mut dig, &mut sig);
            }
            (nid_of_algor(dig), nid_of_algor(sig))
        })
        .collect()
}

/// The signer certificates that a successful `CMS_verify` matched to SignerInfos.
pub fn signers(cms: &CmsContentInfo) -> Vec<X509> {
    // SAFETY: CMS_get0_signers returns a new stack of borrowed certificates:
    // we take a reference on each and free only the stack.
    unsafe {
        let stack = CMS_get0_signers(cms.as_ptr());
        let certs = stack_members(stack)
            .into_iter()
            .filter(|p| !p.is_null())
            .map(|p| X509Ref::from_ptr(p as *mut sys::X509).to_owned())
            .collect();
        if !stack.is_null() {
            sys::OPENSSL_sk_free(stack);
        }
        certs
    }
}

/// Every certificate carried in a SignedData.
pub fn certificates(cms: &CmsContentInfo) -> Vec<X509> {
    // SAFETY: CMS_get1_certs returns a new stack holding a reference on each
    // certificate; we move each reference into an X509 and free the stack.
    unsafe {
        let stack = CMS_get1_certs(cms.as_ptr());
        let certs = stack_members(stack)
            .into_iter()
            .filter(|p| !p.is_null())
            .map(|p| X509::from_ptr(p as *mut sys::X509))
            .collect();
        if !stack.is_null() {
            sys::OPENSSL_sk_free(stack);
        }
        certs
    }
}

/// Key transport recipients of an EnvelopedData or AuthEnvelopedData: for each,
/// its key-encryption algorithm and whether `cert` is that recipient.
pub fn key_transport_recipients(cms: &CmsContentInfo, cert: Option<&X509Ref>) -> Vec<(Nid, bool)> {
    // SAFETY: internal stack, not owned by us; members valid while cms lives.
    let infos = unsafe { CMS_get0_RecipientInfos(cms.as_ptr()) };
    stack_members(infos)
        .into_iter()
        .filter(|ri| unsafe { CMS_RecipientInfo_type(*ri) } == CMS_RECIPINFO_TRANS)
        .map(|ri| {
            let mut alg: *mut sys::X509_ALGOR = ptr::null_mut();
            // SAFETY: ri is a key transport RecipientInfo.
            unsafe {
                CMS_RecipientInfo_ktri_get0_algs(ri, ptr::null_mut(), ptr::null_mut(), &mut alg);
            }
            let matches = cert
                .map(|c| unsafe { CMS_RecipientInfo_ktri_cert_cmp(ri, c.as_ptr()) } == 0)
                .unwrap_or(false);
            (nid_of_algor(alg), matches)
        })
        .collect()
}

/// The keyUsage bits of a certificate (OpenSSL's `KU_*` values), or `None`
/// when the certificate has no keyUsage extension.
pub fn key_usage(cert: &X509Ref) -> Option<u32> {
    // SAFETY: cert is valid; X509_get_key_usage caches extension flags inside it.
    let bits = unsafe { sys::X509_get_key_usage(cert.as_ptr()) };
    if bits == u32::MAX {
        None
    } else {
        Some(bits)
    }
}

/// Whether the certificate is a CA (basicConstraints cA=TRUE).
pub fn is_ca(cert: &X509Ref) -> bool {
    // SAFETY: cert is valid; the flags are computed and cached inside it.
    let flags = unsafe { sys::X509_get_extension_flags(cert.as_ptr()) };
    flags & sys::EXFLAG_CA != 0
}

/// A detached SignedData over `data` by one signer with an explicit digest.
pub fn sign_detached<T: HasPrivate>(
    data: &[u8],
    signer: &X509Ref,
    key: &PKeyRef<T>,
    chain: &StackRef<X509>,
    digest: MessageDigest,
) -> Result<CmsContentInfo, ErrorStack> {
    let flags = sys::CMS_DETACHED | sys::CMS_BINARY | sys::CMS_PARTIAL;
    let bio = MemBio::new(data)?;
    // SAFETY: all pointers are valid for the duration of the calls; the
    // returned ContentInfo is owned by the CmsContentInfo wrapper.
    unsafe {
        let cms = sys::CMS_sign(
            ptr::null_mut(),
            ptr::null_mut(),
            chain.as_ptr(),
            ptr::null_mut(),
            flags,
        );
        if cms.is_null() {
            return Err(ErrorStack::get());
        }
        let cms = CmsContentInfo::from_ptr(cms);
        let si = CMS_add1_signer(
            cms.as_ptr(),
            signer.as_ptr(),
            key.as_ptr(),
            digest.as_ptr(),
            flags,
        );
        if si.is_null() {
            return Err(ErrorStack::get());
        }
        if CMS_final(cms.as_ptr(), bio.0, ptr::null_mut(), flags) != 1 {
            return Err(ErrorStack::get());
        }
        Ok(cms)
    }
}

/// An EnvelopedData (or AuthEnvelopedData for AEAD ciphers) of `data` to every
/// certificate, with RSA PKCS#1 v1.5 or RSA-OAEP key transport.
pub fn encrypt(
    data: &[u8],
    recipients: &[X509],
    cipher: Cipher,
    oaep: bool,
) -> Result<CmsContentInfo, ErrorStack> {
    let flags = sys::CMS_BINARY | sys::CMS_PARTIAL;
    let bio = MemBio::new(data)?;
    // SAFETY: as in sign_detached; the pkey context belongs to the RecipientInfo.
    unsafe {
        let cms = sys::CMS_encrypt(ptr::null_mut(), ptr::null_mut(), cipher.as_ptr(), flags);
        if cms.is_null() {
            return Err(ErrorStack::get());
        }
        let cms = CmsContentInfo::from_ptr(cms);
        for cert in recipients {
            let ri_flags = if oaep { sys::CMS_KEY_PARAM } else { 0 };
            let ri = CMS_add1_recipient_cert(cms.as_ptr(), cert.as_ptr(), ri_flags);
            if ri.is_null() {
                return Err(ErrorStack::get());
            }
            if oaep {
                let pctx = CMS_RecipientInfo_get0_pkey_ctx(ri);
                if pctx.is_null()
                    || sys::EVP_PKEY_CTX_set_rsa_padding(pctx, RSA_PKCS1_OAEP_PADDING) <= 0
                {
                    return Err(ErrorStack::get());
                }
            }
        }
        if CMS_final(cms.as_ptr(), bio.0, ptr::null_mut(), flags) != 1 {
            return Err(ErrorStack::get());
        }
        Ok(cms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki;
    use openssl::cms::CMSOptions;
    use openssl::stack::Stack;

    fn identity() -> pki::Credential {
        let ca = pki::new_ca("ffi test CA", 2048).expect("ca");
        pki::issue(&ca, &pki::LeafSpec::address("a@ffi.example")).expect("leaf")
    }

    #[test]
    fn sign_reports_signer_and_digest_after_verify() {
        let id = identity();
        let chain = Stack::new().expect("stack");
        let mut cms = sign_detached(b"hello", &id.cert, &id.key, &chain, MessageDigest::sha384())
            .expect("sign");
        assert_eq!(content_type(&cms), Nid::PKCS7_SIGNED);
        assert_eq!(signer_algorithms(&cms)[0].0, Nid::SHA384);
        assert_eq!(certificates(&cms).len(), 1);
        cms.verify(
            None,
            None,
            Some(b"hello"),
            None,
            CMSOptions::NO_SIGNER_CERT_VERIFY | CMSOptions::BINARY,
        )
        .expect("verify");
        let signers = signers(&cms);
        assert_eq!(signers.len(), 1);
        assert_eq!(signers[0].to_der().unwrap(), id.cert.to_der().unwrap());
        // and a changed content fails
        let der = cms.to_der().unwrap();
        let mut again = CmsContentInfo::from_der(&der).unwrap();
        assert!(again
            .verify(
                None,
                None,
                Some(b"hellO"),
                None,
                CMSOptions::NO_SIGNER_CERT_VERIFY | CMSOptions::BINARY
            )
            .is_err());
    }

    #[test]
    fn key_usage_and_ca_flags_are_read() {
        let ca = pki::new_ca("ffi CA", 2048).expect("ca");
        let leaf = pki::issue(&ca, &pki::LeafSpec::address("a@ffi.example")).expect("leaf");
        assert!(is_ca(&ca.cert));
        assert!(!is_ca(&leaf.cert));
        // digitalSignature (0x80) | keyEncipherment (0x20)
        assert_eq!(key_usage(&leaf.cert), Some(0x80 | 0x20));
        let spec = pki::LeafSpec {
            digital_signature: false,
            key_encipherment: false,
            ..pki::LeafSpec::address("b@ffi.example")
        };
        let bare = pki::issue(&ca, &spec).expect("leaf without keyUsage");
        assert_eq!(key_usage(&bare.cert), None);
    }

    #[test]
    fn oaep_recipient_is_marked_and_decrypts() {
        let id = identity();
        let other = identity();
        for oaep in [false, true] {
            let cms = encrypt(
                b"secret",
                std::slice::from_ref(&id.cert),
                Cipher::aes_128_cbc(),
                oaep,
            )
            .expect("encrypt");
            assert_eq!(content_type(&cms), Nid::PKCS7_ENVELOPED);
            let mine = key_transport_recipients(&cms, Some(&id.cert));
            let expected = if oaep {
                Nid::from_raw(sys::NID_rsaesOaep)
            } else {
                Nid::RSAENCRYPTION
            };
            assert_eq!(mine, vec![(expected, true)]);
            assert_eq!(
                key_transport_recipients(&cms, Some(&other.cert)),
                vec![(expected, false)]
            );
            assert_eq!(cms.decrypt(&id.key, &id.cert).expect("decrypt"), b"secret");
        }
    }
}
