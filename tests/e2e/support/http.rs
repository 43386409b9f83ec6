//! A small HTTP/1.1 client for the tests (hyper), whole replies or frame by frame.

use bytes::Bytes;
use http::{HeaderMap, Method, Request};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("reply is not JSON ({e}): {}", self.text()))
    }

    /// The `error.message` of an OpenAI-format error body.
    #[track_caller]
    pub fn error_message(&self) -> String {
        self.json()["error"]["message"].as_str().unwrap_or_else(|| panic!("no error.message in {}", self.text())).to_string()
    }
}

pub fn request(method: Method, url: &str, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Request<Full<Bytes>> {
    let mut builder = Request::builder().method(method).uri(url);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(Full::new(body.into())).unwrap()
}

/// Sends a request and reads the whole reply.
pub async fn send(method: Method, url: &str, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Reply {
    send_with(&client(), request(method, url, headers, body)).await
}

pub async fn send_with(client: &HttpClient, request: Request<Full<Bytes>>) -> Reply {
    let response = client.request(request).await.expect("the request reaches the server");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
    Reply { status, headers, body }
}

/// POSTs JSON with a Bearer key.
pub async fn post_json(url: &str, key: &str, body: &str) -> Reply {
    let auth = format!("Bearer {key}");
    send(Method::POST, url, &[("authorization", &auth), ("content-type", "application/json")], body.to_string()).await
}

/// Sends a request and returns the reply head and its still-streaming body.
pub async fn open(method: Method, url: &str, headers: &[(&str, &str)], body: impl Into<Bytes>) -> hyper::Response<Incoming> {
    client().request(request(method, url, headers, body)).await.expect("the request reaches the server")
}

/// Reads the next data frame of a streaming body; `None` at its end.
pub async fn next_data(body: &mut Incoming) -> Option<Result<Bytes, hyper::Error>> {
    loop {
        match body.frame().await? {
            Ok(frame) => {
                if let Ok(data) = frame.into_data() {
                    return Some(Ok(data));
                }
            }
            Err(e) => return Some(Err(e)),
        }
    }
}
