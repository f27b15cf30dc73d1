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
    fn CMS_signed_add1_attr_by_NID(
        si: *mut CMS_SignerInfo,
        nid: c_int,
        kind: c_int,
        bytes: *const c_void,
        len: c_int,
    ) -> c_int;
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
    fn BIO_up_ref(a: *mut sys::BIO) -> c_int;
    fn BIO_free(a: *mut sys::BIO) -> c_int;
    fn BIO_new_CMS(out: *mut sys::BIO, cms: *mut sys::CMS_ContentInfo) -> *mut sys::BIO;
    fn CMS_dataInit(cms: *mut sys::CMS_ContentInfo, icont: *mut sys::BIO) -> *mut sys::BIO;
    fn CMS_dataFinal(cms: *mut sys::CMS_ContentInfo, bio: *mut sys::BIO) -> c_int;
    fn CMS_decrypt_set1_pkey(
        cms: *mut sys::CMS_ContentInfo,
        pk: *mut sys::EVP_PKEY,
        cert: *mut sys::X509,
    ) -> c_int;
    fn CMS_get0_content(cms: *mut sys::CMS_ContentInfo) -> *mut *mut sys::ASN1_OCTET_STRING;
    fn BIO_method_type(b: *const sys::BIO) -> c_int;
}

const BIO_TYPE_CIPHER: c_int = 10 | 0x0200;
const BIO_C_GET_CIPHER_STATUS: c_int = 113;

const CMS_RECIPINFO_TRANS: c_int = 0;
const RSA_PKCS1_OAEP_PADDING: c_int = 4;

/// Frees a BIO chain when dropped.
struct ChainBio(*mut sys::BIO);

impl Drop for ChainBio {
    fn drop(&mut self) {
        // SAFETY: we own our reference to the chain; BIO_free_all stops at a
        // BIO that has another reference.
        unsafe {
            sys::BIO_free_all(self.0);
        }
    }
}

/// Writes all of `data` to a BIO, in pieces that fit a c_int.
fn write_all(bio: *mut sys::BIO, mut data: &[u8]) -> Result<(), ErrorStack> {
    while !data.is_empty() {
        let len = data.len().min(STREAM_CHUNK);
        // SAFETY: bio is valid and data holds len readable bytes.
        let n = unsafe { sys::BIO_write(bio, data.as_ptr() as *const c_void, len as c_int) };
        if n <= 0 {
            return Err(ErrorStack::get());
        }
        data = &data[n as usize..];
    }
    Ok(())
}

/// Largest write into a streaming chain, and so the size of each OCTET
/// STRING of streamed content.
const STREAM_CHUNK: usize = 64 * 1024;

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
    sign_detached_pieces(&[data], signer, key, chain, digest)
}

/// The SMIMECapabilities attribute (RFC 8551 2.5.2) of our signatures: the
/// content ciphers we take, preferred first: AES-256, AES-192 and AES-128 in
/// CBC mode, as the Applicability Statement has them. OpenSSL's own list
/// would also offer 3DES, RC2 and DES (and costs a dozen algorithm look-ups
/// per signature to build).
const SMIME_CAPABILITIES: [u8; 41] = [
    0x30, 0x27, //
    0x30, 0x0b, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x01,
    0x2a, // aes256-CBC
    0x30, 0x0b, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x01,
    0x16, // aes192-CBC
    0x30, 0x0b, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x01,
    0x02, // aes128-CBC
];

/// [`sign_detached`] over the concatenation of `pieces`, which is never
/// made: each piece goes through the digest as it is.
pub fn sign_detached_pieces<T: HasPrivate>(
    pieces: &[&[u8]],
    signer: &X509Ref,
    key: &PKeyRef<T>,
    chain: &StackRef<X509>,
    digest: MessageDigest,
) -> Result<CmsContentInfo, ErrorStack> {
    let flags = sys::CMS_DETACHED | sys::CMS_BINARY | sys::CMS_PARTIAL;
    // SAFETY: all pointers are valid for the duration of the calls; the
    // returned ContentInfo is owned by the CmsContentInfo wrapper, the
    // content BIO chain by ChainBio.
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
            flags | sys::CMS_NOSMIMECAP,
        );
        if si.is_null()
            || CMS_signed_add1_attr_by_NID(
                si,
                sys::NID_SMIMECapabilities,
                sys::V_ASN1_SEQUENCE,
                SMIME_CAPABILITIES.as_ptr().cast(),
                SMIME_CAPABILITIES.len() as c_int,
            ) != 1
        {
            return Err(ErrorStack::get());
        }
        // What CMS_final does, a piece at a time: detached content goes
        // through the digest BIOs into a null BIO.
        let content = CMS_dataInit(cms.as_ptr(), ptr::null_mut());
        if content.is_null() {
            return Err(ErrorStack::get());
        }
        let content = ChainBio(content);
        for piece in pieces {
            write_all(content.0, piece)?;
        }
        if sys::BIO_ctrl(content.0, sys::BIO_CTRL_FLUSH, 0, ptr::null_mut()) <= 0
            || CMS_dataFinal(cms.as_ptr(), content.0) != 1
        {
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
    let cms = enveloped(recipients, cipher, oaep, flags)?;
    // SAFETY: cms and bio are valid for the call.
    unsafe {
        if CMS_final(cms.as_ptr(), bio.0, ptr::null_mut(), flags) != 1 {
            return Err(ErrorStack::get());
        }
        Ok(cms)
    }
}

/// Decrypts an EnvelopedData or AuthEnvelopedData with `key` (whose
/// certificate `cert` picks the recipient info), as CMS_decrypt does, but
/// reading the content straight into the returned Vec: no memory BIO holds
/// a second copy of it. `size_hint` reserves that much up front.
pub fn decrypt<T: HasPrivate>(
    cms: &CmsContentInfo,
    key: &PKeyRef<T>,
    cert: &X509Ref,
    detached: Option<&[u8]>,
    size_hint: usize,
) -> Result<Vec<u8>, ErrorStack> {
    // SAFETY: all pointers are valid while `cms`, `key` and `cert` live; the
    // content BIO chain is owned by ChainBio.
    unsafe {
        let nid = content_type(cms);
        if nid != Nid::PKCS7_ENVELOPED && nid.short_name().ok() != Some(AUTH_ENVELOPED_SN) {
            return Err(ErrorStack::get());
        }
        // The encrypted content is in the structure or given beside it,
        // never both and never neither (that would decrypt to nothing).
        let content = CMS_get0_content(cms.as_ptr());
        let inside = !content.is_null() && !(*content).is_null();
        if inside == detached.is_some() {
            return Err(ErrorStack::get());
        }
        if CMS_decrypt_set1_pkey(cms.as_ptr(), key.as_ptr(), cert.as_ptr()) != 1 {
            return Err(ErrorStack::get());
        }
        // A read-only memory BIO over the detached bytes; CMS_dataInit puts
        // it at the end of the chain, which ChainBio frees.
        let input = match detached {
            Some(bytes) => {
                let Ok(len) = c_int::try_from(bytes.len()) else {
                    return Err(ErrorStack::get());
                };
                let b = sys::BIO_new_mem_buf(bytes.as_ptr() as *const c_void, len);
                if b.is_null() {
                    return Err(ErrorStack::get());
                }
                b
            }
            None => ptr::null_mut(),
        };
        let bio = CMS_dataInit(cms.as_ptr(), input);
        if bio.is_null() {
            if !input.is_null() {
                BIO_free(input);
            }
            return Err(ErrorStack::get());
        }
        let bio = ChainBio(bio);
        let mut out: Vec<u8> = Vec::with_capacity(size_hint);
        loop {
            if out.capacity() - out.len() < STREAM_CHUNK {
                out.reserve(STREAM_CHUNK);
            }
            let spare = out.capacity() - out.len();
            let want = spare.min(c_int::MAX as usize) as c_int;
            let n = sys::BIO_read(bio.0, out.as_mut_ptr().add(out.len()) as *mut c_void, want);
            if n <= 0 {
                // A bad padding or a wrong GCM tag shows here, at the end.
                if BIO_method_type(bio.0) == BIO_TYPE_CIPHER
                    && sys::BIO_ctrl(bio.0, BIO_C_GET_CIPHER_STATUS, 0, ptr::null_mut()) <= 0
                {
                    return Err(ErrorStack::get());
                }
                if n < 0 {
                    return Err(ErrorStack::get());
                }
                break;
            }
            // BIO_read wrote n initialised bytes into the spare capacity.
            out.set_len(out.len() + n as usize);
        }
        Ok(out)
    }
}

/// Verifies a SignedData over detached `content` without copying it: the
/// openssl crate's `verify` always gives OpenSSL a memory BIO for the
/// output, which receives a second copy of the whole content (100 MB more
/// for a 100 MB message); with no output BIO OpenSSL reads the content
/// through its digests into a null sink.
pub fn verify_detached(
    cms: &CmsContentInfo,
    content: &[u8],
    flags: c_uint,
) -> Result<(), ErrorStack> {
    let Ok(len) = c_int::try_from(content.len()) else {
        return Err(ErrorStack::get());
    };
    // SAFETY: the read-only memory BIO borrows `content`, which outlives
    // it; it is freed before returning. CMS_verify with a null output BIO
    // and null certs/store (NO_SIGNER_CERT_VERIFY in flags) only reads.
    unsafe {
        let bio = sys::BIO_new_mem_buf(content.as_ptr() as *const c_void, len);
        if bio.is_null() {
            return Err(ErrorStack::get());
        }
        let ok = sys::CMS_verify(
            cms.as_ptr(),
            ptr::null_mut(),
            ptr::null_mut(),
            bio,
            ptr::null_mut(),
            flags,
        );
        BIO_free(bio);
        if ok == 1 {
            Ok(())
        } else {
            Err(ErrorStack::get())
        }
    }
}

/// The short name OpenSSL gives the AuthEnvelopedData content type.
pub const AUTH_ENVELOPED_SN: &str = "id-smime-ct-authEnvelopedData";

/// An EnvelopedData under construction (CMS_PARTIAL in `flags`) with a
/// key transport recipient per certificate.
fn enveloped(
    recipients: &[X509],
    cipher: Cipher,
    oaep: bool,
    flags: c_uint,
) -> Result<CmsContentInfo, ErrorStack> {
    // SAFETY: the ContentInfo is owned by the wrapper; the pkey context
    // belongs to its RecipientInfo.
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
        Ok(cms)
    }
}

/// [`encrypt`] of the concatenation of `pieces`, streamed: the BER
/// encoding (indefinite lengths, content in OCTET STRINGs of at most 64 KiB)
/// goes to `sink` a chunk at a time as it is made, so neither the content
/// nor the encrypted structure is ever whole in memory.
pub fn encrypt_streaming(
    pieces: &[&[u8]],
    recipients: &[X509],
    cipher: Cipher,
    oaep: bool,
    sink: &mut dyn FnMut(&[u8]),
) -> Result<(), ErrorStack> {
    let flags = sys::CMS_BINARY | sys::CMS_PARTIAL | sys::CMS_STREAM;
    // SAFETY: as in encrypt. `out` holds our reference to the memory BIO;
    // the chain from BIO_new_CMS holds another, so freeing the chain leaves
    // the memory BIO to `out`.
    let cms = enveloped(recipients, cipher, oaep, flags)?;
    unsafe {
        let out = sys::BIO_new(sys::BIO_s_mem());
        if out.is_null() {
            return Err(ErrorStack::get());
        }
        let out = ChainBio(out);
        if BIO_up_ref(out.0) != 1 {
            return Err(ErrorStack::get());
        }
        let chain = BIO_new_CMS(out.0, cms.as_ptr());
        if chain.is_null() {
            BIO_free(out.0);
            return Err(ErrorStack::get());
        }
        let chain = ChainBio(chain);
        let mut buf = vec![0u8; STREAM_CHUNK];
        let mut drain = |sink: &mut dyn FnMut(&[u8])| loop {
            let n = sys::BIO_read(out.0, buf.as_mut_ptr() as *mut c_void, buf.len() as c_int);
            if n <= 0 {
                break;
            }
            sink(&buf[..n as usize]);
        };
        for piece in pieces {
            for chunk in piece.chunks(STREAM_CHUNK) {
                write_all(chain.0, chunk)?;
                drain(sink);
            }
        }
        // Flushing writes the last block and the end-of-contents octets.
        if sys::BIO_ctrl(chain.0, sys::BIO_CTRL_FLUSH, 0, ptr::null_mut()) <= 0 {
            return Err(ErrorStack::get());
        }
        drop(chain);
        drain(sink);
        Ok(())
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
    fn signatures_offer_the_aes_cbc_ciphers_and_none_of_the_legacy_ones() {
        let id = identity();
        let chain = Stack::new().expect("stack");
        let cms = sign_detached(b"caps", &id.cert, &id.key, &chain, MessageDigest::sha256())
            .expect("sign");
        let der = cms.to_der().expect("der");
        let has = |needle: &[u8]| der.windows(needle.len()).any(|w| w == needle);
        // The smimeCapabilities attribute (1.2.840.113549.1.9.15) whose
        // value is the list, in our order of preference...
        let mut attribute = vec![
            0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x0f,
        ];
        attribute.extend_from_slice(&[0x31, 0x29]);
        attribute.extend_from_slice(&SMIME_CAPABILITIES);
        assert!(
            has(&attribute),
            "no SMIMECapabilities attribute with the AES list"
        );
        // ...and no 3DES (1.2.840.113549.3.7), RC2 (.3.2) or DES (1.3.14.3.2.7).
        for legacy in [
            &[0x06, 0x08, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x03, 0x07][..],
            &[0x06, 0x08, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x03, 0x02][..],
            &[0x06, 0x05, 0x2b, 0x0e, 0x03, 0x02, 0x07][..],
        ] {
            assert!(!has(legacy), "legacy cipher offered: {legacy:02x?}");
        }
        // Still a signature that verifies after a round trip through DER.
        let mut again = CmsContentInfo::from_der(&der).expect("parse");
        again
            .verify(
                None,
                None,
                Some(b"caps"),
                None,
                CMSOptions::NO_SIGNER_CERT_VERIFY | CMSOptions::BINARY,
            )
            .expect("verify");
    }

    /// Some bytes that are not all alike, `n` of them.
    fn data(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
    }

    #[test]
    fn signing_in_pieces_signs_their_concatenation() {
        let id = identity();
        let chain = Stack::new().expect("stack");
        let (a, b) = (data(STREAM_CHUNK + 7, 1), data(3 * STREAM_CHUNK, 2));
        let pieces: [&[u8]; 4] = [b"head\r\n", &a, b"", &b];
        let whole = pieces.concat();
        let cms = sign_detached_pieces(&pieces, &id.cert, &id.key, &chain, MessageDigest::sha256())
            .expect("sign");
        let der = cms.to_der().unwrap();
        let verify = |content: &[u8]| {
            CmsContentInfo::from_der(&der).unwrap().verify(
                None,
                None,
                Some(content),
                None,
                CMSOptions::NO_SIGNER_CERT_VERIFY | CMSOptions::BINARY,
            )
        };
        verify(&whole).expect("the concatenation verifies");
        let mut changed = whole.clone();
        changed[STREAM_CHUNK] ^= 1;
        assert!(verify(&changed).is_err(), "one changed byte fails");
        assert!(verify(&whole[1..]).is_err(), "a missing byte fails");

        // The copy-free verification agrees with the crate's.
        let flags = (CMSOptions::NO_SIGNER_CERT_VERIFY | CMSOptions::BINARY).bits();
        let parsed = CmsContentInfo::from_der(&der).unwrap();
        verify_detached(&parsed, &whole, flags).expect("verifies");
        assert!(verify_detached(&parsed, &changed, flags).is_err());
        assert!(verify_detached(&parsed, &whole[1..], flags).is_err());
        assert!(verify_detached(&parsed, b"", flags).is_err());
    }

    #[test]
    fn streaming_encryption_is_ber_that_decrypts_to_the_concatenation() {
        let id = identity();
        let other = identity();
        let big = data(2 * STREAM_CHUNK + 1000, 3);
        for (pieces, oaep) in [
            (vec![&b"x"[..]], false),
            (
                vec![&b"head\r\n"[..], &big[..], &b""[..], &b"tail"[..]],
                true,
            ),
            (vec![&big[..STREAM_CHUNK]], false),
        ] {
            let recipients = [id.cert.clone(), other.cert.clone()];
            let mut ber = Vec::new();
            let mut calls = 0;
            encrypt_streaming(
                &pieces,
                &recipients,
                Cipher::aes_256_cbc(),
                oaep,
                &mut |c| {
                    calls += 1;
                    ber.extend_from_slice(c)
                },
            )
            .expect("encrypt");
            // ContentInfo SEQUENCE with indefinite length: streamed BER.
            assert_eq!(&ber[..2], &[0x30, 0x80]);
            if big.len() < pieces.iter().map(|p| p.len()).sum() {
                assert!(calls > 2, "output arrives in chunks, {calls} calls");
            }
            let cms = CmsContentInfo::from_der(&ber).expect("OpenSSL reads it back");
            assert_eq!(content_type(&cms), Nid::PKCS7_ENVELOPED);
            let infos = key_transport_recipients(&cms, Some(&id.cert));
            assert_eq!(infos.len(), 2, "one recipient info per certificate");
            assert_eq!(infos.iter().filter(|(_, mine)| *mine).count(), 1);
            assert!(infos
                .iter()
                .all(|(nid, _)| (*nid == Nid::from_raw(sys::NID_rsaesOaep)) == oaep));
            for who in [&id, &other] {
                let plain = cms.decrypt(&who.key, &who.cert).expect("decrypt");
                assert_eq!(plain, pieces.concat(), "each recipient gets the content");
            }
        }
    }

    #[test]
    fn decryption_reads_the_content_and_refuses_tampering() {
        let id = identity();
        let other = identity();
        let content = data(3 * STREAM_CHUNK + 5, 4);
        let mut to = Stack::new().unwrap();
        to.push(id.cert.clone()).unwrap();
        for cipher in [Cipher::aes_128_cbc(), Cipher::aes_256_gcm()] {
            let cms = CmsContentInfo::encrypt(&to, &content, cipher, CMSOptions::BINARY)
                .expect("encrypt");
            let der = cms.to_der().unwrap();
            for hint in [0, der.len()] {
                let plain = decrypt(&cms, &id.key, &id.cert, None, hint).expect("decrypt");
                assert_eq!(plain, content);
            }
            assert!(
                decrypt(&cms, &other.key, &other.cert, None, 0).is_err(),
                "not a recipient"
            );
            // A changed byte in the last block: bad padding (CBC) or a
            // wrong tag (GCM), never content.
            let mut tampered = der.clone();
            let at = tampered.len()
                - if cipher == Cipher::aes_256_gcm() {
                    40
                } else {
                    5
                };
            tampered[at] ^= 0x55;
            let tampered = CmsContentInfo::from_der(&tampered).expect("still parses");
            assert!(
                decrypt(&tampered, &id.key, &id.cert, None, 0).is_err(),
                "tampering is caught"
            );
        }
        // Not an EnvelopedData at all.
        let chain = Stack::new().unwrap();
        let signed =
            sign_detached(b"x", &id.cert, &id.key, &chain, MessageDigest::sha256()).unwrap();
        assert!(decrypt(&signed, &id.key, &id.cert, None, 0).is_err());
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
