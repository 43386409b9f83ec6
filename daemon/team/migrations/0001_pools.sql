-- capit team budgets: pools, their members and leases, credits and ledger copies.
-- Money is numeric (exact decimal); times are timestamptz; a window is named by its start in
-- Unix seconds (0 for a total cap), as the members compute it in the pool's time zone.

CREATE TABLE capit_pools (
    name          text PRIMARY KEY,
    cap           numeric NOT NULL CHECK (cap >= 0),
    period        text NOT NULL CHECK (period IN ('day', 'week', 'month', 'total')),
    time_zone     text NOT NULL,
    lease_seconds integer NOT NULL CHECK (lease_seconds BETWEEN 2 AND 86400),
    created_at    timestamptz NOT NULL DEFAULT now(),
    created_by    text NOT NULL DEFAULT ''
);

-- Spend per window: reported ledger copies plus credits (leases charged at expiry).
CREATE TABLE capit_pool_windows (
    pool         text NOT NULL REFERENCES capit_pools (name) ON DELETE CASCADE,
    window_start bigint NOT NULL,
    spent        numeric NOT NULL DEFAULT 0 CHECK (spent >= 0),
    PRIMARY KEY (pool, window_start)
);

-- One row per daemon in a pool; `member` is the daemon's installation id.
CREATE TABLE capit_members (
    pool             text NOT NULL REFERENCES capit_pools (name) ON DELETE CASCADE,
    member           text NOT NULL,
    host             text NOT NULL DEFAULT '',
    lease            numeric NOT NULL DEFAULT 0 CHECK (lease >= 0),
    lease_expires_at timestamptz,
    -- The member's local ledger sequence number up to which it has reported (-1: none).
    reported_seq     bigint NOT NULL DEFAULT -1,
    joined_at        timestamptz NOT NULL DEFAULT now(),
    last_seen        timestamptz NOT NULL DEFAULT now(),
    left_at          timestamptz,
    PRIMARY KEY (pool, member)
);

-- Leases charged as spend when they expired, by the window they were charged in, until the
-- member's reports and lowerings reconcile them.
CREATE TABLE capit_credits (
    pool         text NOT NULL,
    member       text NOT NULL,
    window_start bigint NOT NULL,
    amount       numeric NOT NULL CHECK (amount > 0),
    charged_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (pool, member, window_start),
    FOREIGN KEY (pool, member) REFERENCES capit_members (pool, member) ON DELETE CASCADE
);

-- Copies of the members' ledger entries, one per (member, local sequence number): a batch sent
-- again after a lost reply adds nothing.
CREATE TABLE capit_ledger (
    pool          text NOT NULL,
    member        text NOT NULL,
    seq           bigint NOT NULL,
    batch         bigint NOT NULL,
    grant_name    text NOT NULL,
    model         text NOT NULL,
    api           text NOT NULL,
    cost          numeric NOT NULL CHECK (cost >= 0),
    status        text NOT NULL,
    http_status   integer NOT NULL,
    input_tokens  bigint NOT NULL,
    output_tokens bigint NOT NULL,
    at            timestamptz NOT NULL,
    window_start  bigint NOT NULL,
    reported_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (pool, member, seq),
    FOREIGN KEY (pool, member) REFERENCES capit_members (pool, member) ON DELETE CASCADE
);
CREATE INDEX capit_ledger_pool_at ON capit_ledger (pool, at);
