//! Exact input counts near the cap: the provider's own free call that counts a request's input
//! (Anthropic `POST /v1/messages/count_tokens`, OpenAI `POST /v1/responses/input_tokens`, Gemini
//! `POST …:countTokens`), made only when the bound from the request's bytes does not fit what
//! its grant has left, so a typical request pays nothing extra.
//!
//! Invariant: fail closed. Any failure (no such call for the API, a refusal, a timeout, a reply
//! that is not a count) is `None`, and admission keeps the bound from the bytes.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Uri, header};
use http_body_util::{BodyExt, Limited};

use super::body::GatedBody;
use super::{UpstreamClient, upstream_request};
use crate::providers::MeteredApi;
use crate::request_fields::{count_body, counted_input};
use crate::state::Upstream;

/// How long a count may take before admission goes on without it.
const COUNT_TIMEOUT: Duration = Duration::from_secs(10);

/// The input tokens the provider counts for `body`, or `None` when it cannot be had.
pub async fn count_input(
    client: &UpstreamClient,
    upstream: &Upstream,
    api: MeteredApi,
    body: &[u8],
    model: &str,
    client_headers: &HeaderMap,
    rest: &str,
) -> Option<u64> {
    let count = count_body(api, body, model)?;
    let path = match api {
        MeteredApi::AnthropicMessages => "v1/messages/count_tokens".to_string(),
        MeteredApi::OpenAiResponses => "v1/responses/input_tokens".to_string(),
        MeteredApi::GeminiGenerate => {
            let version = rest.split('/').next().filter(|v| *v == "v1" || *v == "v1beta")?;
            format!("{version}/models/{model}:countTokens")
        }
        MeteredApi::OpenAiChat | MeteredApi::OpenAiEmbeddings => return None,
    };
    let uri: Uri = format!("{}/{path}", upstream.provider.base_url).parse().ok()?;
    // The client's headers carry what the count must see too (Anthropic's version and betas).
    let mut headers = client_headers.clone();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    let request = upstream_request(Method::POST, uri, &headers, upstream, GatedBody::new(Bytes::from(count), None)).ok()?;
    let exchange = async {
        let response = client.request(request).await.ok()?;
        if !response.status().is_success() {
            tracing::debug!(status = response.status().as_u16(), "the input count was refused; keeping the bound from the bytes");
            return None;
        }
        let reply = Limited::new(response.into_body(), 64 * 1024).collect().await.ok()?.to_bytes();
        counted_input(api, &reply)
    };
    let counted = tokio::time::timeout(COUNT_TIMEOUT, exchange).await.ok().flatten();
    tracing::debug!(?counted, api = api.as_str(), "counted a request's input near its cap");
    counted
}
