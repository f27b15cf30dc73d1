//! The one HTTP client: bounded GETs for certificates (DNS CERT IPKIX/URI
//! records), and later trust bundles, CRLs and AIA issuers. OpenSSL is the
//! TLS stack, as everywhere else in hispd.

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{url}: only http and https URLs are fetched")]
    Scheme { url: String },
    #[error("{url}: {why}")]
    Request { url: String, why: String },
    #[error("{url}: HTTP status {status}")]
    Status { url: String, status: u16 },
    #[error("{url}: larger than the limit of {limit} bytes")]
    TooLarge { url: String, limit: usize },
    #[error("{url}: no answer within {secs:.1} s")]
    Timeout { url: String, secs: f64 },
}

/// Limits of one fetch.
#[derive(Clone, Copy, Debug)]
pub struct FetchLimits {
    pub timeout: Duration,
    pub max_bytes: usize,
}

impl Default for FetchLimits {
    fn default() -> Self {
        FetchLimits {
            timeout: Duration::from_secs(5),
            max_bytes: 1024 * 1024,
        }
    }
}

/// GETs `url`, refusing bodies over `limits.max_bytes` (announced or
/// received) and giving up after `limits.timeout` for the whole exchange.
pub async fn fetch(url: &str, limits: FetchLimits) -> Result<Vec<u8>, HttpError> {
    let lower = url.to_ascii_lowercase();
    if !(lower.starts_with("http://") || lower.starts_with("https://")) {
        return Err(HttpError::Scheme { url: url.into() });
    }
    let request = async {
        let client = reqwest::Client::builder()
            .timeout(limits.timeout)
            .redirect(reqwest::redirect::Policy::limited(3))
            .build()
            .map_err(|e| HttpError::Request {
                url: url.into(),
                why: e.to_string(),
            })?;
        let mut response = client
            .get(url)
            .send()
            .await
            .map_err(|e| HttpError::Request {
                url: url.into(),
                why: e.to_string(),
            })?;
        if !response.status().is_success() {
            return Err(HttpError::Status {
                url: url.into(),
                status: response.status().as_u16(),
            });
        }
        if response
            .content_length()
            .is_some_and(|n| n > limits.max_bytes as u64)
        {
            return Err(HttpError::TooLarge {
                url: url.into(),
                limit: limits.max_bytes,
            });
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| HttpError::Request {
            url: url.into(),
            why: e.to_string(),
        })? {
            if body.len() + chunk.len() > limits.max_bytes {
                return Err(HttpError::TooLarge {
                    url: url.into(),
                    limit: limits.max_bytes,
                });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    };
    tokio::time::timeout(limits.timeout, request)
        .await
        .map_err(|_| HttpError::Timeout {
            url: url.into(),
            secs: limits.timeout.as_secs_f64(),
        })?
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A one-shot HTTP server on loopback answering with `response`.
    async fn serve_once(response: Vec<u8>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            if let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(&response).await;
            }
        });
        format!("http://{addr}/cert.der")
    }

    #[tokio::test]
    async fn fetches_within_limits_and_refuses_beyond() {
        let url = serve_once(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello".to_vec(),
        )
        .await;
        assert_eq!(fetch(&url, FetchLimits::default()).await.unwrap(), b"hello");

        let big = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{}",
            "x".repeat(100)
        );
        let url = serve_once(big.into_bytes()).await;
        let limits = FetchLimits {
            max_bytes: 10,
            ..FetchLimits::default()
        };
        assert!(matches!(
            fetch(&url, limits).await,
            Err(HttpError::TooLarge { .. })
        ));

        let url = serve_once(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec()).await;
        assert!(matches!(
            fetch(&url, FetchLimits::default()).await,
            Err(HttpError::Status { status: 404, .. })
        ));

        assert!(matches!(
            fetch("ftp://x/y", FetchLimits::default()).await,
            Err(HttpError::Scheme { .. })
        ));
    }

    #[tokio::test]
    async fn a_silent_server_times_out() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _held = listener.accept().await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let limits = FetchLimits {
            timeout: Duration::from_millis(200),
            ..FetchLimits::default()
        };
        let err = fetch(&format!("http://{addr}/"), limits).await.unwrap_err();
        assert!(
            matches!(err, HttpError::Timeout { .. } | HttpError::Request { .. }),
            "{err}"
        );
    }
}
