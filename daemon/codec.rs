//! Compact binary records for the store's busiest tables: ledger entries and running totals,
//! written once per settled request. JSON (which records before this format were written in)
//! costs several times the CPU on the writer thread; the records it wrote are still read.
//!
//! Each record starts with a tag byte that no JSON document starts with, then fixed-width
//! integers (little-endian), LEB128 varints for counts, length-prefixed UTF-8 text, and
//! decimals in `rust_decimal`'s own 16-byte form, exactly as they were. Pure: bytes in, values
//! out; a record that does not parse is an error, never a panic.

use rust_decimal::Decimal;

use crate::grants::GrantId;
use crate::ledger::{EntryStatus, LedgerEntry, Totals};
use crate::usage::Usage;

const ENTRY_TAG: u8 = 0xC1;
const TOTALS_TAG: u8 = 0xC2;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CodecError(&'static str);

/// True when `bytes` is a record in this binary form (else it is an older JSON one).
pub fn is_binary(bytes: &[u8]) -> bool {
    matches!(bytes.first(), Some(&ENTRY_TAG) | Some(&TOTALS_TAG))
}

struct Writer(Vec<u8>);

impl Writer {
    fn varint(&mut self, mut n: u64) {
        while n >= 0x80 {
            self.0.push((n as u8) | 0x80);
            n >>= 7;
        }
        self.0.push(n as u8);
    }

    fn text(&mut self, s: &str) {
        self.varint(s.len() as u64);
        self.0.extend_from_slice(s.as_bytes());
    }

    fn decimal(&mut self, d: Decimal) {
        self.0.extend_from_slice(&d.serialize());
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
        if self.0.len() < n {
            return Err(CodecError("the record is cut short"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn byte(&mut self) -> Result<u8, CodecError> {
        Ok(self.take(1)?[0])
    }

    fn varint(&mut self) -> Result<u64, CodecError> {
        let mut n = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            n |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(n);
            }
        }
        Err(CodecError("a count runs past 64 bits"))
    }

    fn i64(&mut self) -> Result<i64, CodecError> {
        let bytes: [u8; 8] = self.take(8)?.try_into().map_err(|_| CodecError("bad integer"))?;
        Ok(i64::from_le_bytes(bytes))
    }

    fn text(&mut self) -> Result<String, CodecError> {
        let len = usize::try_from(self.varint()?).map_err(|_| CodecError("text too long"))?;
        String::from_utf8(self.take(len)?.to_vec()).map_err(|_| CodecError("text is not UTF-8"))
    }

    fn decimal(&mut self) -> Result<Decimal, CodecError> {
        let bytes: [u8; 16] = self.take(16)?.try_into().map_err(|_| CodecError("bad decimal"))?;
        Ok(Decimal::deserialize(bytes))
    }

    fn done(&self) -> Result<(), CodecError> {
        if self.0.is_empty() { Ok(()) } else { Err(CodecError("trailing bytes after the record")) }
    }
}

fn status_code(status: EntryStatus) -> u8 {
    match status {
        EntryStatus::Metered => 0,
        EntryStatus::Estimated => 1,
        EntryStatus::UpstreamError => 2,
        EntryStatus::Interrupted => 3,
    }
}

fn status_of(code: u8) -> Result<EntryStatus, CodecError> {
    Ok(match code {
        0 => EntryStatus::Metered,
        1 => EntryStatus::Estimated,
        2 => EntryStatus::UpstreamError,
        3 => EntryStatus::Interrupted,
        _ => return Err(CodecError("unknown entry status")),
    })
}

pub fn encode_entry(entry: &LedgerEntry) -> Vec<u8> {
    let mut w = Writer(Vec::with_capacity(96 + entry.model.len() + entry.api.len()));
    w.0.push(ENTRY_TAG);
    w.varint(entry.grant.0);
    w.0.extend_from_slice(&entry.at_ms.to_le_bytes());
    w.text(&entry.model);
    w.text(&entry.api);
    let u = &entry.usage;
    for n in [
        u.input_tokens,
        u.cached_input_tokens,
        u.cache_write_5m_tokens,
        u.cache_write_1h_tokens,
        u.output_tokens,
        u.reasoning_tokens,
        u.web_search_requests,
    ] {
        w.varint(n);
    }
    match u.reported_cost {
        Some(cost) => {
            w.0.push(1);
            w.decimal(cost);
        }
        None => w.0.push(0),
    }
    w.decimal(entry.cost);
    w.0.push(status_code(entry.status));
    w.varint(u64::from(entry.http_status));
    match &entry.error {
        Some(error) => {
            w.0.push(1);
            w.text(error);
        }
        None => w.0.push(0),
    }
    w.0
}

pub fn decode_entry(bytes: &[u8]) -> Result<LedgerEntry, CodecError> {
    let mut r = Reader(bytes);
    if r.byte()? != ENTRY_TAG {
        return Err(CodecError("not a binary ledger entry"));
    }
    let grant = GrantId(r.varint()?);
    let at_ms = r.i64()?;
    let model = r.text()?;
    let api = r.text()?;
    let mut counts = [0u64; 7];
    for n in &mut counts {
        *n = r.varint()?;
    }
    let reported_cost = if r.byte()? == 1 { Some(r.decimal()?) } else { None };
    let usage = Usage {
        input_tokens: counts[0],
        cached_input_tokens: counts[1],
        cache_write_5m_tokens: counts[2],
        cache_write_1h_tokens: counts[3],
        output_tokens: counts[4],
        reasoning_tokens: counts[5],
        web_search_requests: counts[6],
        reported_cost,
    };
    let cost = r.decimal()?;
    let status = status_of(r.byte()?)?;
    let http_status = u16::try_from(r.varint()?).map_err(|_| CodecError("bad HTTP status"))?;
    let error = if r.byte()? == 1 { Some(r.text()?) } else { None };
    r.done()?;
    Ok(LedgerEntry { grant, at_ms, model, api, usage, cost, status, http_status, error })
}

pub fn encode_totals(t: &Totals) -> Vec<u8> {
    let mut w = Writer(Vec::with_capacity(64));
    w.0.push(TOTALS_TAG);
    w.decimal(t.spent);
    for n in [
        t.requests,
        t.input_tokens,
        t.cached_input_tokens,
        t.cache_write_tokens,
        t.output_tokens,
        t.reasoning_tokens,
        t.estimated,
        t.errors,
    ] {
        w.varint(n);
    }
    w.varint(t.refused.len() as u64);
    for (reason, n) in &t.refused {
        w.text(reason);
        w.varint(*n);
    }
    w.0
}

pub fn decode_totals(bytes: &[u8]) -> Result<Totals, CodecError> {
    let mut r = Reader(bytes);
    if r.byte()? != TOTALS_TAG {
        return Err(CodecError("not binary totals"));
    }
    let spent = r.decimal()?;
    let mut counts = [0u64; 8];
    for n in &mut counts {
        *n = r.varint()?;
    }
    let mut refused = std::collections::BTreeMap::new();
    for _ in 0..r.varint()? {
        let reason = r.text()?;
        refused.insert(reason, r.varint()?);
    }
    r.done()?;
    Ok(Totals {
        spent,
        requests: counts[0],
        input_tokens: counts[1],
        cached_input_tokens: counts[2],
        cache_write_tokens: counts[3],
        output_tokens: counts[4],
        reasoning_tokens: counts[5],
        estimated: counts[6],
        errors: counts[7],
        refused,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> LedgerEntry {
        LedgerEntry {
            grant: GrantId(300),
            at_ms: 1_764_600_000_123,
            model: "claude-sonnet-4-5-20250929".into(),
            api: "messages".into(),
            usage: Usage {
                input_tokens: 12_050,
                cached_input_tokens: 10_000,
                cache_write_5m_tokens: 1_024,
                cache_write_1h_tokens: 1_024,
                output_tokens: 420,
                reasoning_tokens: 300,
                web_search_requests: 1,
                reported_cost: Some("0.00095".parse().unwrap()),
            },
            cost: "0.039434".parse().unwrap(),
            status: EntryStatus::Estimated,
            http_status: 200,
            error: Some("cut off: the reply passed its reservation".into()),
        }
    }

    #[test]
    fn entries_and_totals_round_trip_exactly_and_smaller_than_json() {
        let e = entry();
        let bytes = encode_entry(&e);
        assert!(is_binary(&bytes));
        assert_eq!(decode_entry(&bytes), Ok(e.clone()));
        assert!(bytes.len() * 2 < serde_json::to_vec(&e).unwrap().len(), "{} bytes", bytes.len());
        let plain = LedgerEntry { usage: Usage::default(), error: None, cost: Decimal::MAX, status: EntryStatus::Metered, ..e };
        assert_eq!(decode_entry(&encode_entry(&plain)), Ok(plain));

        let mut t = Totals::default();
        t.add(&entry()).unwrap();
        t.count_refusal("would_exceed_cap");
        t.count_refusal("rpm");
        assert_eq!(decode_totals(&encode_totals(&t)), Ok(t.clone()));
        assert!(!is_binary(&serde_json::to_vec(&t).unwrap()), "JSON records are told apart");
    }

    #[test]
    fn a_broken_record_is_an_error_never_a_panic() {
        let bytes = encode_entry(&entry());
        for cut in 0..bytes.len() {
            assert!(decode_entry(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(decode_entry(&trailing).is_err());
        assert!(decode_entry(&[ENTRY_TAG, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]).is_err());
        assert!(decode_totals(&[TOTALS_TAG]).is_err());
    }
}
