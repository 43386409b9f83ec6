//! The team database: the only module that knows tokio-postgres. Connecting (TLS through
//! rustls, the certificate always verified), versioned migrations applied on join (one
//! transaction each, under an advisory lock, recorded in `capit_schema_migrations`), and the
//! short transactions a member runs. Every transaction of a member on a pool first locks the
//! pool's row, so they are serialised per pool, and charges the leases that have expired.
//!
//! Times that decide expiry are the database server's (`now()`), so members' clocks need not
//! agree for a lease to expire safely; windows are named by each member's clock, in the pool's
//! time zone.

use std::collections::BTreeMap;
use std::time::Duration;

use rust_decimal::Decimal;
use tokio_postgres::{Client, GenericClient, Transaction};

use super::account::{self, Books};
use super::url::DbUrl;
use super::{PoolSpec, TeamError};
use crate::grants::Period;
use crate::lease::LeaseError;
use crate::secret::Secret;

/// The schema this capitd knows, in order. Never edit one that has shipped: add another.
const MIGRATIONS: &[(i32, &str, &str)] = &[(1, "pools, members, credits, ledger copies", include_str!("migrations/0001_pools.sql"))];

/// Held (per transaction) while migrations are applied, so members joining at once do not race.
const MIGRATION_LOCK: i64 = 0x6361_7069_7431;

/// How long connecting may take before the database counts as unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

fn db_error(e: tokio_postgres::Error) -> TeamError {
    match e.as_db_error() {
        Some(db) => TeamError::Database(format!("{}: {}", db.severity(), db.message())),
        None if e.is_closed() => TeamError::Unreachable("the connection was closed".into()),
        None => {
            // The driver's own message is terse ("error performing TLS handshake"); its causes say why.
            let mut message = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                message.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            TeamError::Unreachable(message)
        }
    }
}

/// An open connection to the team database.
pub struct Database {
    client: Client,
    connection: tokio::task::JoinHandle<()>,
}

impl Drop for Database {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

fn tls_config(url: &DbUrl) -> Result<rustls::ClientConfig, TeamError> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    if let Some(path) = &url.root_cert {
        let bad = |e: &dyn std::fmt::Display| TeamError::Invalid(format!("sslrootcert {}: {e}", path.display()));
        for cert in CertificateDer::pem_file_iter(path).map_err(|e| bad(&e))? {
            roots.add(cert.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
        }
    }
    rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| TeamError::Invalid(format!("TLS: {e}")))
        .map(|builder| builder.with_root_certificates(roots).with_no_client_auth())
}

/// Connects to the team database.
pub async fn connect(url: &DbUrl, password: Option<&Secret>) -> Result<Database, TeamError> {
    let mut config: tokio_postgres::Config =
        url.driver_url.parse().map_err(|e: tokio_postgres::Error| TeamError::Invalid(format!("the database URL: {e}")))?;
    if let Some(password) = password {
        config.password(password.expose());
    }
    config.connect_timeout(CONNECT_TIMEOUT).application_name("capitd");
    let tls = tokio_postgres_rustls::MakeRustlsConnect::new(tls_config(url)?);
    let (client, connection) = match tokio::time::timeout(CONNECT_TIMEOUT * 2, config.connect(tls)).await {
        Ok(Ok(pair)) => pair,
        Ok(Err(e)) => return Err(db_error(e)),
        Err(_) => return Err(TeamError::Unreachable(format!("no answer from {} within {:?}", url.display(), CONNECT_TIMEOUT * 2))),
    };
    let connection = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "team database connection ended");
        }
    });
    Ok(Database { client, connection })
}

/// A ledger entry as the pool keeps a copy of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LedgerCopy {
    /// The member's own ledger sequence number: the copy's identity.
    pub seq: u64,
    pub grant: String,
    pub model: String,
    pub api: String,
    pub cost: Decimal,
    pub status: String,
    pub http_status: u16,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub at_ms: i64,
    /// The pool window it settled in.
    pub window_start: i64,
}

/// One member's transaction: report `rows` (may be empty) and, with `target`, make its cover
/// that amount.
#[derive(Clone, Debug)]
pub struct Sync<'a> {
    pub pool: &'a str,
    pub member: &'a str,
    /// The current window's start, by the member's clock.
    pub window: i64,
    pub rows: &'a [LedgerCopy],
    pub target: Option<Decimal>,
}

/// What a member's transaction left.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Synced {
    /// This member's lease plus credits, as committed.
    pub cover: Decimal,
    pub lease: Decimal,
    pub credit: Decimal,
    /// The pool's spend in the current window and every member's live lease.
    pub spent: Decimal,
    pub leases: Decimal,
    pub cap: Decimal,
    /// The most this member's cover could be now (its cover and the room the pool has left).
    pub room: Decimal,
    /// The raise asked for did not fit (the report part was committed all the same).
    pub refused: Option<LeaseError>,
    /// Rows new to the pool, and what they cost.
    pub new_rows: usize,
    pub new_cost: Decimal,
    /// Expired leases charged in this transaction: (member, amount).
    pub charged: Vec<(String, Decimal)>,
}

/// A pool and this member's place in it, as read on join.
#[derive(Clone, Debug)]
pub struct Joined {
    pub spec: PoolSpec,
    /// The last local ledger sequence number the pool has from this member, if any.
    pub reported_seq: Option<u64>,
    /// What the pool has set aside for this member (from before a restart).
    pub cover: Decimal,
}

/// One member as `team ls` shows it.
#[derive(Clone, Debug)]
pub struct MemberStatus {
    pub member: String,
    pub host: String,
    pub lease: Decimal,
    pub credit: Decimal,
    /// Seconds until the lease expires (negative: expired, not charged yet), if it has one.
    pub expires_in: Option<i64>,
    pub last_seen_ago: i64,
    pub left: bool,
}

/// A pool as `team ls` shows it.
#[derive(Clone, Debug)]
pub struct PoolStatus {
    pub spec: PoolSpec,
    pub spent: Decimal,
    pub leases: Decimal,
    pub credits: Decimal,
    pub members: Vec<MemberStatus>,
}

/// A row of `team usage`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageRow {
    pub key: String,
    pub spent: Decimal,
    pub requests: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// How `team usage` groups the pool's ledger.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UsageBy {
    Member,
    Grant,
    Model,
    Day,
}

impl UsageBy {
    pub fn parse(text: &str) -> Option<UsageBy> {
        Some(match text {
            "member" => UsageBy::Member,
            "grant" => UsageBy::Grant,
            "model" => UsageBy::Model,
            "day" => UsageBy::Day,
            _ => return None,
        })
    }

    fn key_sql(self) -> &'static str {
        match self {
            UsageBy::Member => "coalesce(nullif(m.host, '') || '/', '') || l.member",
            UsageBy::Grant => "l.grant_name",
            UsageBy::Model => "l.model",
            UsageBy::Day => "to_char(l.at AT TIME ZONE p.time_zone, 'YYYY-MM-DD')",
        }
    }
}

fn period_of(text: &str) -> Result<Period, TeamError> {
    Period::parse(text).ok_or_else(|| TeamError::Database(format!("the pool's period {text:?} is not one capit knows")))
}

fn seq_of(value: i64) -> Option<u64> {
    u64::try_from(value).ok()
}

async fn read_spec(txn: &impl GenericClient, pool: &str, lock: bool) -> Result<PoolSpec, TeamError> {
    let sql = if lock {
        "SELECT cap, period, time_zone, lease_seconds FROM capit_pools WHERE name = $1 FOR UPDATE"
    } else {
        "SELECT cap, period, time_zone, lease_seconds FROM capit_pools WHERE name = $1"
    };
    let row = txn.query_opt(sql, &[&pool]).await.map_err(db_error)?.ok_or_else(|| TeamError::UnknownPool(pool.to_string()))?;
    Ok(PoolSpec {
        name: pool.to_string(),
        cap: row.get(0),
        period: period_of(row.get(1))?,
        time_zone: row.get(2),
        lease_seconds: u32::try_from(row.get::<_, i32>(3)).unwrap_or(super::DEFAULT_LEASE_SECONDS),
    })
}

/// Charges every lease of `pool` that has expired as spend in `window` (a credit of its member),
/// in the caller's transaction, which holds the pool's row lock.
async fn charge_expired(txn: &Transaction<'_>, pool: &str, window: i64) -> Result<Vec<(String, Decimal)>, TeamError> {
    let expired = txn
        .query("SELECT member, lease FROM capit_members WHERE pool = $1 AND lease > 0 AND lease_expires_at < now() FOR UPDATE", &[&pool])
        .await
        .map_err(db_error)?;
    if expired.is_empty() {
        return Ok(Vec::new());
    }
    let mut spent: Decimal = txn
        .query_opt("SELECT spent FROM capit_pool_windows WHERE pool = $1 AND window_start = $2", &[&pool, &window])
        .await
        .map_err(db_error)?
        .map_or(Decimal::ZERO, |row| row.get(0));
    let mut charged = Vec::with_capacity(expired.len());
    for row in expired {
        let (member, lease): (String, Decimal) = (row.get(0), row.get(1));
        let mut credit: Decimal = txn
            .query_opt("SELECT amount FROM capit_credits WHERE pool = $1 AND member = $2 AND window_start = $3", &[&pool, &member, &window])
            .await
            .map_err(db_error)?
            .map_or(Decimal::ZERO, |row| row.get(0));
        account::charge_expired(&mut spent, &mut credit, lease)?;
        txn.execute(
            "INSERT INTO capit_credits (pool, member, window_start, amount) VALUES ($1, $2, $3, $4)
             ON CONFLICT (pool, member, window_start) DO UPDATE SET amount = EXCLUDED.amount, charged_at = now()",
            &[&pool, &member, &window, &credit],
        )
        .await
        .map_err(db_error)?;
        txn.execute("UPDATE capit_members SET lease = 0, lease_expires_at = NULL WHERE pool = $1 AND member = $2", &[&pool, &member])
            .await
            .map_err(db_error)?;
        tracing::warn!(pool, member = %member, amount = %lease, "a team member's lease expired unrenewed; charged as spend");
        charged.push((member, lease));
    }
    write_spent(txn, pool, &BTreeMap::from([(window, spent)])).await?;
    Ok(charged)
}

async fn write_spent(txn: &Transaction<'_>, pool: &str, spent: &BTreeMap<i64, Decimal>) -> Result<(), TeamError> {
    for (window, amount) in spent {
        txn.execute(
            "INSERT INTO capit_pool_windows (pool, window_start, spent) VALUES ($1, $2, $3)
             ON CONFLICT (pool, window_start) DO UPDATE SET spent = EXCLUDED.spent",
            &[&pool, window, amount],
        )
        .await
        .map_err(db_error)?;
    }
    Ok(())
}

impl Database {
    /// Applies the migrations this database lacks, each in its own transaction; refuses a
    /// database whose schema is newer than this capitd.
    pub async fn migrate(&mut self) -> Result<(), TeamError> {
        let known = MIGRATIONS.last().map_or(0, |m| m.0);
        for (version, name, sql) in MIGRATIONS {
            let txn = self.client.transaction().await.map_err(db_error)?;
            txn.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await.map_err(db_error)?;
            txn.batch_execute(
                "CREATE TABLE IF NOT EXISTS capit_schema_migrations (
                     version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())",
            )
            .await
            .map_err(db_error)?;
            let newest: Option<i32> =
                txn.query_one("SELECT max(version) FROM capit_schema_migrations", &[]).await.map_err(db_error)?.get(0);
            if let Some(found) = newest.filter(|found| *found > known) {
                return Err(TeamError::SchemaTooNew { found, known });
            }
            let applied =
                txn.query_opt("SELECT 1 FROM capit_schema_migrations WHERE version = $1", &[version]).await.map_err(db_error)?.is_some();
            if !applied {
                txn.batch_execute(sql).await.map_err(db_error)?;
                txn.execute("INSERT INTO capit_schema_migrations (version, name) VALUES ($1, $2)", &[version, name])
                    .await
                    .map_err(db_error)?;
                tracing::info!(version, name, "applied a team database migration");
            }
            txn.commit().await.map_err(db_error)?;
        }
        Ok(())
    }

    /// Makes a pool.
    pub async fn create_pool(&mut self, spec: &PoolSpec, created_by: &str) -> Result<(), TeamError> {
        spec.validate()?;
        let lease_seconds = i32::try_from(spec.lease_seconds).unwrap_or(i32::MAX);
        let made = self
            .client
            .execute(
                "INSERT INTO capit_pools (name, cap, period, time_zone, lease_seconds, created_by) VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (name) DO NOTHING",
                &[&spec.name, &spec.cap, &spec.period.as_str(), &spec.time_zone, &lease_seconds, &created_by],
            )
            .await
            .map_err(db_error)?;
        if made == 0 {
            return Err(TeamError::PoolExists(spec.name.clone()));
        }
        Ok(())
    }

    /// Adds this member to a pool (or finds it there again, after a restart or a new join).
    pub async fn join(&mut self, pool: &str, member: &str, host: &str) -> Result<Joined, TeamError> {
        let txn = self.client.transaction().await.map_err(db_error)?;
        let spec = read_spec(&txn, pool, false).await?;
        txn.execute(
            "INSERT INTO capit_members (pool, member, host) VALUES ($1, $2, $3)
             ON CONFLICT (pool, member) DO UPDATE SET host = EXCLUDED.host, left_at = NULL, last_seen = now()",
            &[&pool, &member, &host],
        )
        .await
        .map_err(db_error)?;
        let row = txn
            .query_one(
                "SELECT m.reported_seq, m.lease + coalesce((SELECT sum(amount) FROM capit_credits c
                     WHERE c.pool = m.pool AND c.member = m.member), 0)
                 FROM capit_members m WHERE m.pool = $1 AND m.member = $2",
                &[&pool, &member],
            )
            .await
            .map_err(db_error)?;
        txn.commit().await.map_err(db_error)?;
        Ok(Joined { spec, reported_seq: seq_of(row.get(0)), cover: row.get(1) })
    }

    /// One member's transaction on a pool: charge expired leases, carry its old credits, record
    /// the rows it reports (once each), then make its cover `target`. A raise that does not fit
    /// leaves the cover as the report left it, and the report is committed all the same.
    pub async fn sync(&mut self, sync: Sync<'_>) -> Result<Synced, TeamError> {
        let Sync { pool, member, window, rows, target } = sync;
        let txn = self.client.transaction().await.map_err(db_error)?;
        let spec = read_spec(&txn, pool, true).await?;
        let charged = charge_expired(&txn, pool, window).await?;
        let me = txn
            .query_opt("SELECT lease FROM capit_members WHERE pool = $1 AND member = $2 AND left_at IS NULL FOR UPDATE", &[&pool, &member])
            .await
            .map_err(db_error)?
            .ok_or_else(|| TeamError::NotJoined(pool.to_string()))?;
        let credits: BTreeMap<i64, Decimal> = txn
            .query("SELECT window_start, amount FROM capit_credits WHERE pool = $1 AND member = $2", &[&pool, &member])
            .await
            .map_err(db_error)?
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect();
        let others_leases: Decimal = txn
            .query_one("SELECT coalesce(sum(lease), 0) FROM capit_members WHERE pool = $1 AND member <> $2", &[&pool, &member])
            .await
            .map_err(db_error)?
            .get(0);
        let new_rows = insert_rows(&txn, pool, member, rows).await?;
        let mut windows: Vec<i64> = credits.keys().copied().chain(new_rows.iter().map(|r| r.0)).chain([window]).collect();
        windows.sort_unstable();
        windows.dedup();
        let mut spent: BTreeMap<i64, Decimal> = txn
            .query("SELECT window_start, spent FROM capit_pool_windows WHERE pool = $1 AND window_start = ANY($2)", &[&pool, &windows])
            .await
            .map_err(db_error)?
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect();
        for w in &windows {
            spent.entry(*w).or_insert(Decimal::ZERO);
        }
        let mut books = Books { cap: spec.cap, window, spent, others_leases, lease: me.get(0), credits };
        books.carry_credits()?;
        let mut new_cost = Decimal::ZERO;
        for (row_window, cost) in &new_rows {
            books.record(*row_window, *cost)?;
            new_cost = new_cost.checked_add(*cost).ok_or(TeamError::Overflow)?;
        }
        let refused = match target.map(|t| books.set_cover(t)) {
            Some(Err(TeamError::Lease(refusal))) => Some(refusal),
            Some(Err(other)) => return Err(other),
            Some(Ok(())) | None => None,
        };
        write_spent(&txn, pool, &books.spent).await?;
        txn.execute("DELETE FROM capit_credits WHERE pool = $1 AND member = $2", &[&pool, &member]).await.map_err(db_error)?;
        for (w, amount) in &books.credits {
            txn.execute(
                "INSERT INTO capit_credits (pool, member, window_start, amount) VALUES ($1, $2, $3, $4)",
                &[&pool, &member, w, amount],
            )
            .await
            .map_err(db_error)?;
        }
        let last_seq = rows.iter().map(|r| r.seq).max().map_or(-1, |s| i64::try_from(s).unwrap_or(i64::MAX));
        let ttl = f64::from(spec.lease_seconds);
        txn.execute(
            "UPDATE capit_members SET lease = $3::numeric,
                 lease_expires_at = CASE WHEN $3::numeric > 0 THEN now() + make_interval(secs => $4::float8) END,
                 reported_seq = greatest(reported_seq, $5), last_seen = now()
             WHERE pool = $1 AND member = $2",
            &[&pool, &member, &books.lease, &ttl, &last_seq],
        )
        .await
        .map_err(db_error)?;
        txn.commit().await.map_err(db_error)?;
        let cover = books.cover()?;
        let room = books.room()?;
        let credit = cover - books.lease;
        let leases = books.others_leases.checked_add(books.lease).ok_or(TeamError::Overflow)?;
        Ok(Synced {
            cover,
            lease: books.lease,
            credit,
            spent: books.spent_now(),
            leases,
            cap: spec.cap,
            room,
            refused,
            new_rows: new_rows.len(),
            new_cost,
            charged,
        })
    }

    /// Leaves a pool: only with nothing left to report and no cover (the caller has lowered it).
    pub async fn leave(&mut self, pool: &str, member: &str) -> Result<(), TeamError> {
        let left = self
            .client
            .execute(
                "UPDATE capit_members SET left_at = now(), lease = 0, lease_expires_at = NULL
                 WHERE pool = $1 AND member = $2 AND lease = 0
                   AND NOT EXISTS (SELECT 1 FROM capit_credits c WHERE c.pool = $1 AND c.member = $2)",
                &[&pool, &member],
            )
            .await
            .map_err(db_error)?;
        if left == 0 {
            return Err(TeamError::Invalid(format!("this member still holds room in pool {pool:?}; try again once it is reported")));
        }
        Ok(())
    }

    /// The pool's standing in `window`.
    pub async fn status(&mut self, pool: &str, window: i64) -> Result<PoolStatus, TeamError> {
        let spec = read_spec(&self.client, pool, false).await?;
        let spent: Decimal = self
            .client
            .query_opt("SELECT spent FROM capit_pool_windows WHERE pool = $1 AND window_start = $2", &[&pool, &window])
            .await
            .map_err(db_error)?
            .map_or(Decimal::ZERO, |row| row.get(0));
        let rows = self
            .client
            .query(
                "SELECT m.member, m.host, m.lease,
                     coalesce((SELECT sum(amount) FROM capit_credits c WHERE c.pool = m.pool AND c.member = m.member), 0),
                     extract(epoch FROM m.lease_expires_at - now())::bigint,
                     extract(epoch FROM now() - m.last_seen)::bigint, m.left_at IS NOT NULL
                 FROM capit_members m WHERE m.pool = $1 ORDER BY m.joined_at, m.member",
                &[&pool],
            )
            .await
            .map_err(db_error)?;
        let members: Vec<MemberStatus> = rows
            .iter()
            .map(|row| MemberStatus {
                member: row.get(0),
                host: row.get(1),
                lease: row.get(2),
                credit: row.get(3),
                expires_in: row.get(4),
                last_seen_ago: row.get(5),
                left: row.get(6),
            })
            .collect();
        let sum = |f: fn(&MemberStatus) -> Decimal| members.iter().map(f).try_fold(Decimal::ZERO, |a, b| a.checked_add(b));
        let leases = sum(|m| m.lease).ok_or(TeamError::Overflow)?;
        let credits = sum(|m| m.credit).ok_or(TeamError::Overflow)?;
        Ok(PoolStatus { spec, spent, leases, credits, members })
    }

    /// The pool's ledger copies since `since_ms`, grouped.
    pub async fn usage(&mut self, pool: &str, by: UsageBy, since_ms: i64) -> Result<Vec<UsageRow>, TeamError> {
        let sql = format!(
            "SELECT {key}, sum(l.cost), count(*), sum(l.input_tokens)::bigint, sum(l.output_tokens)::bigint
             FROM capit_ledger l JOIN capit_members m USING (pool, member) JOIN capit_pools p ON p.name = l.pool
             WHERE l.pool = $1 AND l.at >= to_timestamp($2::float8 / 1000) GROUP BY 1 ORDER BY 1",
            key = by.key_sql()
        );
        let since = since_ms as f64;
        let rows = self.client.query(&sql, &[&pool, &since]).await.map_err(db_error)?;
        Ok(rows
            .iter()
            .map(|row| UsageRow {
                key: row.get(0),
                spent: row.get(1),
                requests: u64::try_from(row.get::<_, i64>(2)).unwrap_or(0),
                input_tokens: u64::try_from(row.get::<_, i64>(3)).unwrap_or(0),
                output_tokens: u64::try_from(row.get::<_, i64>(4)).unwrap_or(0),
            })
            .collect())
    }

    /// The pool as it is stored.
    pub async fn pool(&mut self, pool: &str) -> Result<PoolSpec, TeamError> {
        read_spec(&self.client, pool, false).await
    }
}

/// Inserts the rows the pool does not have yet; returns each new row's (window, cost).
async fn insert_rows(txn: &Transaction<'_>, pool: &str, member: &str, rows: &[LedgerCopy]) -> Result<Vec<(i64, Decimal)>, TeamError> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let int = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    let batch = rows.iter().map(|r| int(r.seq)).max().unwrap_or(0);
    let seqs: Vec<i64> = rows.iter().map(|r| int(r.seq)).collect();
    let grants: Vec<&str> = rows.iter().map(|r| r.grant.as_str()).collect();
    let models: Vec<&str> = rows.iter().map(|r| r.model.as_str()).collect();
    let apis: Vec<&str> = rows.iter().map(|r| r.api.as_str()).collect();
    let costs: Vec<Decimal> = rows.iter().map(|r| r.cost).collect();
    let statuses: Vec<&str> = rows.iter().map(|r| r.status.as_str()).collect();
    let http: Vec<i32> = rows.iter().map(|r| i32::from(r.http_status)).collect();
    let input: Vec<i64> = rows.iter().map(|r| int(r.input_tokens)).collect();
    let output: Vec<i64> = rows.iter().map(|r| int(r.output_tokens)).collect();
    let at: Vec<f64> = rows.iter().map(|r| r.at_ms as f64 / 1000.0).collect();
    let windows: Vec<i64> = rows.iter().map(|r| r.window_start).collect();
    let inserted = txn
        .query(
            "INSERT INTO capit_ledger (pool, member, batch, seq, grant_name, model, api, cost, status, http_status,
                                       input_tokens, output_tokens, at, window_start)
             SELECT $1, $2, $3, u.seq, u.grant_name, u.model, u.api, u.cost, u.status, u.http_status,
                    u.input_tokens, u.output_tokens, to_timestamp(u.at), u.window_start
             FROM unnest($4::bigint[], $5::text[], $6::text[], $7::text[], $8::numeric[], $9::text[], $10::integer[],
                         $11::bigint[], $12::bigint[], $13::float8[], $14::bigint[])
                  AS u(seq, grant_name, model, api, cost, status, http_status, input_tokens, output_tokens, at, window_start)
             ON CONFLICT (pool, member, seq) DO NOTHING
             RETURNING window_start, cost",
            &[&pool, &member, &batch, &seqs, &grants, &models, &apis, &costs, &statuses, &http, &input, &output, &at, &windows],
        )
        .await
        .map_err(db_error)?;
    Ok(inserted.iter().map(|row| (row.get(0), row.get(1))).collect())
}
