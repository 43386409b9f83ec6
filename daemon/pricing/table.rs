//! The price table: three layers looked up by the model a reply names. The built-in rows
//! (`prices.json`, compiled in) are shadowed by a fetched price list (`capitctl price update`,
//! replaced whole each time), which the user's own prices (`price set`, `price import`) shadow
//! in turn. Every row above the built-in ones says where it came from and when.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::Price;

/// Where a price came from, and when (Unix seconds).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provenance {
    /// `price set`, `import FILE`, or the URL a price list was fetched from.
    pub source: String,
    pub at: i64,
}

/// The layer a listed price comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PriceSource {
    Builtin,
    /// The fetched price list.
    List,
    /// The user's own: `price set` or `price import`.
    Override,
}

/// One model whose effective price a change to the table moved.
#[derive(Clone, Debug, PartialEq)]
pub struct PriceChange {
    pub model: String,
    /// `None`: the model had no price before.
    pub before: Option<Price>,
    /// `None`: the model has no price now.
    pub after: Option<Price>,
}

/// One row of [`PriceTable::entries`].
pub struct PriceRow<'a> {
    pub model: &'a str,
    pub price: &'a Price,
    pub source: PriceSource,
    /// Unset for built-in rows (their `checked` date says when they were checked).
    pub origin: Option<&'a Provenance>,
}

#[derive(Clone, Debug, Default)]
pub struct PriceTable {
    builtin: BTreeMap<String, Arc<Price>>,
    list: BTreeMap<String, Arc<Price>>,
    list_origin: Option<Provenance>,
    overrides: BTreeMap<String, Arc<Price>>,
    override_origins: BTreeMap<String, Provenance>,
}

#[derive(Deserialize)]
struct BuiltinFile {
    models: BTreeMap<String, Price>,
}

impl PriceTable {
    /// The table compiled into this binary, with the given overrides on top.
    pub fn with_overrides(overrides: BTreeMap<String, Price>) -> PriceTable {
        let file: BuiltinFile =
            serde_json::from_str(include_str!("../prices.json")).expect("the built-in price table is valid; a unit test parses it");
        PriceTable { builtin: shared(file.models), overrides: shared(overrides), ..PriceTable::default() }
    }

    /// Records where the overrides came from (those without a record predate provenance).
    pub fn with_override_origins(mut self, origins: BTreeMap<String, Provenance>) -> PriceTable {
        self.override_origins = origins;
        self
    }

    /// Puts a fetched price list in place of the previous one.
    pub fn replace_list(&mut self, list: BTreeMap<String, Price>, origin: Option<Provenance>) {
        self.list = shared(list);
        self.list_origin = origin;
    }

    pub fn set_override(&mut self, model: String, price: Price, origin: Provenance) {
        self.override_origins.insert(model.clone(), origin);
        self.overrides.insert(model, Arc::new(price));
    }

    /// Where the current price list came from, if one was fetched.
    pub fn list_origin(&self) -> Option<&Provenance> {
        self.list_origin.as_ref()
    }

    /// Finds the price of `model`, trying the name as given, then without a provider prefix
    /// (`openai/…`, `models/…`) and without a dated-snapshot suffix
    /// (`gpt-5-mini-2025-08-07` → `gpt-5-mini`, `claude-sonnet-4-5-20250929` → `claude-sonnet-4-5`).
    /// A user's own price wins over the list for any of those names, and the list over the
    /// built-in rows. Returns the table's name for the model and its price.
    pub fn lookup(&self, model: &str) -> Option<(&str, &Arc<Price>)> {
        let names = candidates(model);
        for layer in [&self.overrides, &self.list, &self.builtin] {
            for candidate in names.iter().flatten() {
                if let Some((name, price)) = layer.get_key_value(*candidate) {
                    return Some((name.as_str(), price));
                }
            }
        }
        None
    }

    /// Every priced model, each shown from the layer that wins for its name, sorted by name.
    pub fn entries(&self) -> Vec<PriceRow<'_>> {
        let mut rows: BTreeMap<&str, PriceRow<'_>> = BTreeMap::new();
        for (model, price) in &self.builtin {
            rows.insert(model, PriceRow { model, price, source: PriceSource::Builtin, origin: None });
        }
        for (model, price) in &self.list {
            rows.insert(model, PriceRow { model, price, source: PriceSource::List, origin: self.list_origin.as_ref() });
        }
        for (model, price) in &self.overrides {
            rows.insert(model, PriceRow { model, price, source: PriceSource::Override, origin: self.override_origins.get(model) });
        }
        rows.into_values().collect()
    }

    /// The models whose effective price differs between `self` and `after`, by name.
    pub fn changes(&self, after: &PriceTable) -> Vec<PriceChange> {
        let index = |t: &PriceTable| -> BTreeMap<String, Price> {
            t.entries().into_iter().map(|row| (row.model.to_string(), row.price.clone())).collect()
        };
        let (old, new) = (index(self), index(after));
        let mut names: Vec<&String> = old.keys().chain(new.keys()).collect();
        names.sort();
        names.dedup();
        names
            .into_iter()
            .filter_map(|name| {
                let (before, after) = (old.get(name), new.get(name));
                let same = match (before, after) {
                    (Some(a), Some(b)) => same_money(a, b),
                    (None, None) => true,
                    _ => false,
                };
                (!same).then(|| PriceChange { model: name.clone(), before: before.cloned(), after: after.cloned() })
            })
            .collect()
    }
}

/// Whether two prices charge the same for every request (dates and labels aside).
fn same_money(a: &Price, b: &Price) -> bool {
    a.base == b.base
        && a.long_context == b.long_context
        && a.web_search_per_1k == b.web_search_per_1k
        && a.max_output_tokens == b.max_output_tokens
        && a.max_input_tokens == b.max_input_tokens
}

/// The names to try for a model, most specific first: parts of the name itself, so a lookup
/// (once per request and once per settlement) allocates nothing.
fn candidates(model: &str) -> [Option<&str>; 3] {
    let unprefixed = model.rsplit_once('/').map_or(model, |(_, m)| m);
    [Some(model), (unprefixed != model).then_some(unprefixed), strip_date_suffix(unprefixed)]
}

fn shared(prices: BTreeMap<String, Price>) -> BTreeMap<String, Arc<Price>> {
    prices.into_iter().map(|(model, price)| (model, Arc::new(price))).collect()
}

/// `name-2025-08-07` or `name-20250807` → `name`.
fn strip_date_suffix(model: &str) -> Option<&str> {
    let is_digits = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit());
    if let Some((head, tail)) = model.rsplit_once('-')
        && is_digits(tail, 8)
    {
        return Some(head);
    }
    let parts: Vec<&str> = model.rsplitn(4, '-').collect();
    if parts.len() == 4 && is_digits(parts[0], 2) && is_digits(parts[1], 2) && is_digits(parts[2], 4) {
        return Some(parts[3]);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> PriceTable {
        PriceTable::with_overrides(BTreeMap::new())
    }

    fn price(input: &str, output: &str) -> Price {
        let mut p = table().lookup("gpt-5").unwrap().1.as_ref().clone();
        p.base.input = input.parse().unwrap();
        p.base.output = output.parse().unwrap();
        p
    }

    fn at(t: i64) -> Provenance {
        Provenance { source: "test".into(), at: t }
    }

    #[test]
    fn every_model_the_agents_send_by_default_is_priced() {
        // Claude Code 2.1.197 (and its `sonnet` alias), Codex CLI 0.169.0 (and the snapshot its
        // replies name), opencode 1.18.33 (main and title calls), Gemini CLI 0.61's router,
        // aider's OpenAI default, Continue's and openclaw's capit model; Gemini CLI 0.61's flash and pro
        // routes.
        let t = table();
        for (sent, row) in [
            ("claude-opus-4-8", "claude-opus-4-8"),
            ("claude-sonnet-5", "claude-sonnet-5"),
            ("gpt-6.1-sol", "gpt-6.1-sol"),
            ("gpt-6.1-sol-2026-09-29", "gpt-6.1-sol"),
            ("claude-sonnet-4-6", "claude-sonnet-4-6"),
            ("claude-haiku-4-5-20251001", "claude-haiku-4-5"),
            ("gemini-3.5-flash-lite", "gemini-3.5-flash-lite"),
            ("gemini-3.5-flash", "gemini-3.5-flash"),
            ("gemini-3.8-flash", "gemini-3.8-flash"),
            ("gemini-3.1-pro-preview", "gemini-3.1-pro-preview"),
            ("gemini-3.1-pro-preview-customtools", "gemini-3.1-pro-preview-customtools"),
            ("gpt-4o", "gpt-4o"),
            ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
        ] {
            assert_eq!(t.lookup(sent).map(|(name, _)| name), Some(row), "{sent}");
        }
    }

    #[test]
    fn a_users_price_wins_over_the_list_and_the_list_over_the_built_in_rows() {
        let mut t = table();
        let mut list = BTreeMap::new();
        list.insert("gpt-5-mini-2025-08-07".to_string(), price("7", "8"));
        list.insert("brand-new".to_string(), price("1", "2"));
        t.replace_list(list, Some(at(10)));
        assert_eq!(t.lookup("gpt-5-mini-2025-08-07").unwrap().1.base.input, "7".parse().unwrap());
        assert_eq!(t.lookup("gpt-5-mini").unwrap().1.base.input, "0.25".parse().unwrap(), "the built-in row for the bare name");
        t.set_override("gpt-5-mini".into(), price("9", "9"), at(20));
        assert_eq!(
            t.lookup("gpt-5-mini-2025-08-07").unwrap().1.base.input,
            "9".parse().unwrap(),
            "set by the user: wins for the snapshot too"
        );
        let rows = t.entries();
        let row = |m: &str| rows.iter().find(|r| r.model == m).unwrap();
        assert_eq!((row("brand-new").source, row("brand-new").origin.map(|o| o.at)), (PriceSource::List, Some(10)));
        assert_eq!((row("gpt-5-mini").source, row("gpt-5-mini").origin.map(|o| o.at)), (PriceSource::Override, Some(20)));
        assert_eq!((row("gpt-5").source, row("gpt-5").origin.is_none()), (PriceSource::Builtin, true));
    }

    #[test]
    fn changes_name_what_moved() {
        let before = table();
        let mut after = before.clone();
        let mut list = BTreeMap::new();
        list.insert("gpt-5".to_string(), price("2", "10"));
        list.insert("gpt-5-mini".to_string(), before.lookup("gpt-5-mini").unwrap().1.as_ref().clone());
        list.insert("new-model".to_string(), price("1", "1"));
        after.replace_list(list, Some(at(1)));
        let changes = before.changes(&after);
        let names: Vec<&str> = changes.iter().map(|c| c.model.as_str()).collect();
        assert_eq!(names, ["gpt-5", "new-model"], "gpt-5-mini's price did not move");
        assert!(changes[1].before.is_none() && changes[1].after.is_some());
        let mut emptied = after.clone();
        emptied.replace_list(BTreeMap::new(), None);
        let back = after.changes(&emptied);
        assert_eq!(back.iter().map(|c| c.model.as_str()).collect::<Vec<_>>(), ["gpt-5", "new-model"]);
        assert!(back[1].after.is_none(), "a model only the list priced has no price once it goes");
    }
}
