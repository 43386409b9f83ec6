//! The provider table: which upstreams exist, where they live, how they authenticate, and
//! which of their endpoints the proxy meters.
//!
//! Invariant: [`route`] is the single allowlist of the proxy. A path it does not name as
//! metered or free is refused, so nothing billable can pass unmetered.

use std::fmt;

/// The wire dialect a provider speaks, which fixes its auth header, routes and error format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProviderKind {
    OpenAi,
    Anthropic,
    Gemini,
    OpenRouter,
    OpenAiCompatible,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::OpenAi => "openai",
            ProviderKind::Anthropic => "anthropic",
            ProviderKind::Gemini => "gemini",
            ProviderKind::OpenRouter => "openrouter",
            ProviderKind::OpenAiCompatible => "openai-compatible",
        }
    }

    pub fn parse(text: &str) -> Option<ProviderKind> {
        Some(match text {
            "openai" => ProviderKind::OpenAi,
            "anthropic" => ProviderKind::Anthropic,
            "gemini" => ProviderKind::Gemini,
            "openrouter" => ProviderKind::OpenRouter,
            "openai-compatible" => ProviderKind::OpenAiCompatible,
            _ => return None,
        })
    }

    /// The family of error bodies this provider's clients understand.
    pub fn error_format(self) -> ErrorFormat {
        match self {
            ProviderKind::Anthropic => ErrorFormat::Anthropic,
            ProviderKind::Gemini => ErrorFormat::Google,
            ProviderKind::OpenAi | ProviderKind::OpenRouter | ProviderKind::OpenAiCompatible => ErrorFormat::OpenAi,
        }
    }

    /// How the master key is presented upstream.
    pub fn auth_style(self) -> AuthStyle {
        match self {
            ProviderKind::Anthropic => AuthStyle::XApiKey,
            ProviderKind::Gemini => AuthStyle::XGoogApiKey,
            ProviderKind::OpenAi | ProviderKind::OpenRouter | ProviderKind::OpenAiCompatible => AuthStyle::Bearer,
        }
    }

    /// The path a client appends to `http://127.0.0.1:PORT/<name>` to get its base URL.
    pub fn client_base_suffix(self) -> &'static str {
        match self {
            ProviderKind::Anthropic | ProviderKind::Gemini => "",
            ProviderKind::OpenAi | ProviderKind::OpenRouter | ProviderKind::OpenAiCompatible => "/v1",
        }
    }
}

impl fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorFormat {
    OpenAi,
    Anthropic,
    Google,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthStyle {
    Bearer,
    XApiKey,
    XGoogApiKey,
}

/// One upstream as the user configured it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Provider {
    pub name: String,
    #[serde(with = "kind_serde")]
    pub kind: ProviderKind,
    pub base_url: String,
    /// Every request is priced at zero (a local server); no price table entry is needed.
    #[serde(default)]
    pub price_zero: bool,
}

mod kind_serde {
    use super::ProviderKind;

    pub fn serialize<S: serde::Serializer>(kind: &ProviderKind, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(kind.as_str())
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<ProviderKind, D::Error> {
        let text: String = serde::Deserialize::deserialize(d)?;
        ProviderKind::parse(&text).ok_or_else(|| serde::de::Error::custom(format!("unknown provider kind {text:?}")))
    }
}

/// The providers every installation starts with, at their public base URLs.
pub fn builtin_providers() -> Vec<Provider> {
    [
        ("openai", ProviderKind::OpenAi, "https://api.openai.com"),
        ("anthropic", ProviderKind::Anthropic, "https://api.anthropic.com"),
        ("gemini", ProviderKind::Gemini, "https://generativelanguage.googleapis.com"),
        ("openrouter", ProviderKind::OpenRouter, "https://openrouter.ai/api"),
    ]
    .into_iter()
    .map(|(name, kind, base_url)| Provider { name: name.to_string(), kind, base_url: base_url.to_string(), price_zero: false })
    .collect()
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProviderError {
    #[error("provider name {0:?} must be 1-40 characters of a-z, 0-9, '-' or '_', starting with a letter")]
    BadName(String),
    #[error("base URL {0:?} must start with http:// or https:// and have a host, with no query or fragment")]
    BadBaseUrl(String),
    #[error("unknown provider kind {0:?}; a provider added by name must be of kind openai-compatible")]
    BadKind(String),
    #[error("the provider name {0:?} is capit's own (its endpoints live under /capit/)")]
    Reserved(String),
}

/// Checks a user-chosen provider name; it becomes the first segment of proxy paths.
pub fn validate_name(name: &str) -> Result<(), ProviderError> {
    let ok = (1..=40).contains(&name.len())
        && name.as_bytes()[0].is_ascii_lowercase()
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if !ok {
        return Err(ProviderError::BadName(name.to_string()));
    }
    if name == "capit" {
        return Err(ProviderError::Reserved(name.to_string()));
    }
    Ok(())
}

/// Checks and normalises a base URL (no trailing slash), so that joining paths is plain
/// concatenation.
pub fn normalize_base_url(url: &str) -> Result<String, ProviderError> {
    let bad = || ProviderError::BadBaseUrl(url.to_string());
    let rest = url.strip_prefix("https://").or_else(|| url.strip_prefix("http://")).ok_or_else(bad)?;
    let host = rest.split('/').next().unwrap_or("");
    if host.is_empty() || url.contains('?') || url.contains('#') || url.chars().any(char::is_whitespace) {
        return Err(bad());
    }
    Ok(url.trim_end_matches('/').to_string())
}

/// What the proxy does with a request, decided from the provider kind, method and path alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// Billable: forwarded with metering of the given usage format.
    Metered(MeteredApi),
    /// Free to call (model lists, token counting): forwarded without metering.
    Free,
    /// Answered by the proxy itself without going upstream (Claude Code's telemetry batch).
    Local,
}

/// The billable APIs, each with its own request fields and usage shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MeteredApi {
    OpenAiChat,
    OpenAiResponses,
    OpenAiEmbeddings,
    AnthropicMessages,
    GeminiGenerate,
}

impl MeteredApi {
    pub fn as_str(self) -> &'static str {
        match self {
            MeteredApi::OpenAiChat => "chat.completions",
            MeteredApi::OpenAiResponses => "responses",
            MeteredApi::OpenAiEmbeddings => "embeddings",
            MeteredApi::AnthropicMessages => "messages",
            MeteredApi::GeminiGenerate => "generateContent",
        }
    }
}

/// Routes `method path` (the part after `/<provider>/`, without the query) for a provider kind.
/// `None` means refused: the path is not known to be free and is not metered.
/// The path must be normal (see [`crate::request_path`]): anything with a dot segment, an empty
/// segment or a character that would need encoding is refused here too, whoever calls.
pub fn route(kind: ProviderKind, method: &http::Method, path: &str) -> Option<Endpoint> {
    use http::Method as M;
    if !crate::request_path::is_normal(path) {
        return None;
    }
    let path = path.trim_end_matches('/');
    let metered = |api| Some(Endpoint::Metered(api));
    let models = |p: &str, prefix: &str| p == prefix.trim_end_matches('/') || is_single_segment(p, prefix);
    match kind {
        ProviderKind::OpenAi | ProviderKind::OpenAiCompatible | ProviderKind::OpenRouter => match (method, path) {
            (&M::POST, "v1/chat/completions") => metered(MeteredApi::OpenAiChat),
            (&M::POST, "v1/embeddings") => metered(MeteredApi::OpenAiEmbeddings),
            (&M::POST, "v1/responses") if kind != ProviderKind::OpenRouter => metered(MeteredApi::OpenAiResponses),
            (&M::GET, p) if models(p, "v1/models/") => Some(Endpoint::Free),
            _ => None,
        },
        ProviderKind::Anthropic => match (method, path) {
            (&M::POST, "v1/messages") => metered(MeteredApi::AnthropicMessages),
            (&M::POST, "v1/messages/count_tokens") => Some(Endpoint::Free),
            (&M::GET, p) if models(p, "v1/models/") => Some(Endpoint::Free),
            (&M::POST, "api/event_logging/batch") => Some(Endpoint::Local),
            _ => None,
        },
        ProviderKind::Gemini => {
            let version_rest = path.strip_prefix("v1beta/").or_else(|| path.strip_prefix("v1/"))?;
            match (method, gemini_call(version_rest)) {
                (&M::POST, Some((_, "generateContent" | "streamGenerateContent"))) => metered(MeteredApi::GeminiGenerate),
                (&M::POST, Some((_, "countTokens"))) => Some(Endpoint::Free),
                (&M::GET, None) if models(version_rest, "models/") => Some(Endpoint::Free),
                _ => None,
            }
        }
    }
}

/// Splits a Gemini `models/{model}:{method}` path (after the version) into model and method.
pub fn gemini_call(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix("models/")?;
    let (model, method) = rest.split_once(':')?;
    (!model.is_empty() && !model.contains('/')).then_some((model, method))
}

/// The model a Gemini path names, e.g. `gemini-2.5-flash` in
/// `v1beta/models/gemini-2.5-flash:streamGenerateContent`.
pub fn gemini_model(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("v1beta/").or_else(|| path.strip_prefix("v1/"))?;
    gemini_call(rest).map(|(model, _)| model)
}

fn is_single_segment(path: &str, prefix: &str) -> bool {
    path.strip_prefix(prefix).is_some_and(|id| !id.is_empty() && !id.contains('/'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;

    #[test]
    fn openai_routes() {
        let k = ProviderKind::OpenAi;
        assert_eq!(route(k, &Method::POST, "v1/chat/completions"), Some(Endpoint::Metered(MeteredApi::OpenAiChat)));
        assert_eq!(route(k, &Method::GET, "v1/models"), Some(Endpoint::Free));
        assert_eq!(route(k, &Method::GET, "v1/models/gpt-5"), Some(Endpoint::Free));
        assert_eq!(route(k, &Method::GET, "v1/chat/completions"), None);
        assert_eq!(route(k, &Method::POST, "v1/images/generations"), None);
        assert_eq!(route(k, &Method::GET, "v1/models/a/b"), None);
        assert_eq!(route(k, &Method::POST, "v1/responses"), Some(Endpoint::Metered(MeteredApi::OpenAiResponses)));
        assert_eq!(route(k, &Method::POST, "v1/embeddings"), Some(Endpoint::Metered(MeteredApi::OpenAiEmbeddings)));
        assert_eq!(route(ProviderKind::OpenRouter, &Method::POST, "v1/responses"), None);
        assert_eq!(route(k, &Method::POST, "v1/completions"), None);
        // Only what the allowlist names, exactly: no dot segments or encoded separators.
        assert_eq!(route(k, &Method::GET, "v1/models/.."), None);
        assert_eq!(route(k, &Method::GET, "v1/models/..%2Fv1%2Ffiles"), None);
        assert_eq!(route(k, &Method::GET, "v1/models/a;b"), None);
        assert_eq!(route(k, &Method::GET, "v1/models//"), None);
        assert_eq!(route(k, &Method::GET, "v1/models/"), Some(Endpoint::Free));
    }

    #[test]
    fn anthropic_routes() {
        let k = ProviderKind::Anthropic;
        assert_eq!(route(k, &Method::POST, "v1/messages"), Some(Endpoint::Metered(MeteredApi::AnthropicMessages)));
        assert_eq!(route(k, &Method::POST, "v1/messages/count_tokens"), Some(Endpoint::Free));
        assert_eq!(route(k, &Method::GET, "v1/models"), Some(Endpoint::Free));
        assert_eq!(route(k, &Method::POST, "api/event_logging/batch"), Some(Endpoint::Local));
        assert_eq!(route(k, &Method::POST, "v1/messages/batches"), None);
        assert_eq!(route(k, &Method::POST, "v1/complete"), None);
    }

    #[test]
    fn gemini_routes() {
        let k = ProviderKind::Gemini;
        let generate = Some(Endpoint::Metered(MeteredApi::GeminiGenerate));
        assert_eq!(route(k, &Method::POST, "v1beta/models/gemini-2.5-flash:generateContent"), generate);
        assert_eq!(route(k, &Method::POST, "v1/models/gemini-2.5-flash:streamGenerateContent"), generate);
        assert_eq!(route(k, &Method::POST, "v1beta/models/gemini-2.5-flash:countTokens"), Some(Endpoint::Free));
        assert_eq!(route(k, &Method::GET, "v1beta/models"), Some(Endpoint::Free));
        assert_eq!(route(k, &Method::GET, "v1beta/models/gemini-2.5-flash"), Some(Endpoint::Free));
        assert_eq!(route(k, &Method::POST, "v1beta/models/gemini-2.5-flash:batchGenerateContent"), None);
        assert_eq!(route(k, &Method::POST, "v1beta/tunedModels/x:generateContent"), None);
        assert_eq!(route(k, &Method::POST, "v1beta/cachedContents"), None);
        assert_eq!(gemini_model("v1beta/models/gemini-3.5-flash:generateContent"), Some("gemini-3.5-flash"));
    }

    #[test]
    fn names_and_urls() {
        assert!(validate_name("ollama").is_ok());
        assert!(validate_name("my-vllm_2").is_ok());
        assert!(validate_name("Bad").is_err());
        assert!(validate_name("").is_err());
        assert!(validate_name("1abc").is_err());
        assert_eq!(validate_name("capit"), Err(ProviderError::Reserved("capit".into())), "its paths are capit's own endpoints");
        assert_eq!(normalize_base_url("http://127.0.0.1:9/").unwrap(), "http://127.0.0.1:9");
        assert_eq!(normalize_base_url("https://openrouter.ai/api").unwrap(), "https://openrouter.ai/api");
        assert!(normalize_base_url("ftp://x").is_err());
        assert!(normalize_base_url("http://").is_err());
        assert!(normalize_base_url("http://x/?a=1").is_err());
    }
}
