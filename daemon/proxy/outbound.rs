//! The daemon's own calls to an upstream (OpenRouter's key-management API), as opposed to the
//! requests it forwards: a small JSON request with a Bearer key, over the same TLS client as the
//! proxy, with a timeout and a bounded reply. Hyper stays here; callers see plain values.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, header};
use http_body_util::{BodyExt, Limited};

use super::UpstreamClient;
use super::body::GatedBody;
use crate::secret::Secret;

/// Replies larger than this are refused: a key listing of a few hundred keys is far smaller.
const MAX_REPLY_BYTES: usize = 8 * 1024 * 1024;

/// A client for the daemon's own upstream calls.
#[derive(Clone)]
pub struct Outbound {
    client: UpstreamClient,
    timeout: Duration,
}

/// An upstream's answer: its status and whole body.
#[derive(Debug)]
pub struct OutboundReply {
    pub status: u16,
    pub body: Bytes,
}

#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    #[error("{0} is not a valid URL")]
    BadUrl(String),
    #[error("the key cannot be sent as a header")]
    BadKey,
    #[error("could not reach {url}: {detail}")]
    Unreachable { url: String, detail: String },
    #[error("{url} did not answer within {seconds} s")]
    Timeout { url: String, seconds: u64 },
    #[error("the reply from {0} was larger than capit accepts")]
    TooLarge(String),
}

impl Outbound {
    pub fn new(client: UpstreamClient, timeout: Duration) -> Outbound {
        Outbound { client, timeout }
    }

    /// Sends `method url` with `Authorization: Bearer <key>` and, when given, a JSON body; waits
    /// for the whole reply (within the timeout).
    pub async fn send(&self, method: &str, url: &str, key: &Secret, json: Option<String>) -> Result<OutboundReply, OutboundError> {
        let method = http::Method::from_bytes(method.as_bytes()).map_err(|_| OutboundError::BadUrl(url.to_string()))?;
        let uri: http::Uri = url.parse().map_err(|_| OutboundError::BadUrl(url.to_string()))?;
        let mut auth = HeaderValue::from_str(&format!("Bearer {}", key.expose())).map_err(|_| OutboundError::BadKey)?;
        auth.set_sensitive(true);
        let mut builder = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::AUTHORIZATION, auth)
            .header(header::ACCEPT, "application/json")
            .header(header::ACCEPT_ENCODING, "identity")
            .header(header::USER_AGENT, concat!("capitd/", env!("CARGO_PKG_VERSION")));
        if json.is_some() {
            builder = builder.header(header::CONTENT_TYPE, "application/json");
        }
        let body = GatedBody::new(json.map(Bytes::from).unwrap_or_default(), None);
        let request = builder.body(body).map_err(|_| OutboundError::BadUrl(url.to_string()))?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| OutboundError::Unreachable { url: url.to_string(), detail: super::error_chain(&e) })?;
            let status = response.status().as_u16();
            let body = Limited::new(response.into_body(), MAX_REPLY_BYTES).collect().await.map_err(|e| {
                if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
                    OutboundError::TooLarge(url.to_string())
                } else {
                    OutboundError::Unreachable { url: url.to_string(), detail: e.to_string() }
                }
            })?;
            Ok(OutboundReply { status, body: body.to_bytes() })
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(OutboundError::Timeout { url: url.to_string(), seconds: self.timeout.as_secs() }),
        }
    }
}
