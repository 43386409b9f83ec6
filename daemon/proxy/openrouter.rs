//! OpenRouter's model prices, from its own model list (`GET /api/v1/models`), fetched when an
//! OpenRouter request first needs them and refreshed hourly (or a minute after a model was not
//! found, since new models appear there first). A failed fetch keeps what was known; with
//! nothing known, the request is priced from capit's table or refused.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Uri};
use http_body_util::{BodyExt, Limited};

use super::body::GatedBody;
use super::{UpstreamClient, upstream_request};
use crate::pricing::Price;
use crate::state::Upstream;

const REFRESH_AFTER: Duration = Duration::from_secs(3600);
const RETRY_MISS_AFTER: Duration = Duration::from_secs(60);
const FETCH_TIMEOUT: Duration = Duration::from_secs(15);
/// OpenRouter's whole list is a few MiB.
const MAX_LIST_BYTES: usize = 64 * 1024 * 1024;

#[derive(Default)]
pub struct ModelPrices {
    /// Serialises fetches, so that concurrent requests wait for one instead of each fetching.
    cached: tokio::sync::Mutex<Option<Listed>>,
}

struct Listed {
    base_url: String,
    fetched: Instant,
    /// When the last fetch was tried, successful or not.
    tried: Instant,
    prices: BTreeMap<String, Arc<Price>>,
}

impl ModelPrices {
    /// The price OpenRouter lists for `model`, if any is known.
    pub async fn price(&self, client: &UpstreamClient, upstream: &Upstream, model: &str) -> Option<Arc<Price>> {
        let mut cached = self.cached.lock().await;
        let listed = cached.as_ref().filter(|l| l.base_url == upstream.provider.base_url);
        let due = match listed {
            None => true,
            Some(l) => {
                let since_tried = l.tried.elapsed();
                since_tried >= RETRY_MISS_AFTER && (l.fetched.elapsed() >= REFRESH_AFTER || !l.prices.contains_key(model))
            }
        };
        if due {
            let now = Instant::now();
            match fetch(client, upstream).await {
                Some(prices) => {
                    tracing::debug!(models = prices.len(), "fetched OpenRouter's model prices");
                    *cached = Some(Listed { base_url: upstream.provider.base_url.clone(), fetched: now, tried: now, prices });
                }
                None => match cached.as_mut().filter(|l| l.base_url == upstream.provider.base_url) {
                    Some(listed) => listed.tried = now,
                    None => {
                        tracing::warn!("OpenRouter's model list could not be fetched; only capit's own prices apply");
                        *cached = Some(Listed {
                            base_url: upstream.provider.base_url.clone(),
                            fetched: now - REFRESH_AFTER,
                            tried: now,
                            prices: BTreeMap::new(),
                        });
                    }
                },
            }
        }
        cached.as_ref().filter(|l| l.base_url == upstream.provider.base_url)?.prices.get(model).cloned()
    }
}

async fn fetch(client: &UpstreamClient, upstream: &Upstream) -> Option<BTreeMap<String, Arc<Price>>> {
    let uri: Uri = format!("{}/v1/models", upstream.provider.base_url).parse().ok()?;
    let request = upstream_request(Method::GET, uri, &HeaderMap::new(), upstream, GatedBody::new(Bytes::new(), None)).ok()?;
    let exchange = async {
        let response = client.request(request).await.ok()?;
        if !response.status().is_success() {
            return None;
        }
        let body = Limited::new(response.into_body(), MAX_LIST_BYTES).collect().await.ok()?.to_bytes();
        crate::pricing::openrouter::parse_models(&body)
    };
    let prices = tokio::time::timeout(FETCH_TIMEOUT, exchange).await.ok().flatten()?;
    Some(prices.into_iter().map(|(model, price)| (model, Arc::new(price))).collect())
}
