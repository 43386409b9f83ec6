//! The full-screen `capitctl watch` (ratatui): each active grant's spend against its cap as a
//! bar with what requests in flight hold and its requests per minute, a sparkline of spend per
//! minute over the last hour, and the requests, refusals and alerts as they come, newest first.
//! Keys: q or Esc quits, ↑/↓ and PgUp/PgDn scroll the list, Home goes back to the newest.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use ratatui::Frame;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Gauge, List, ListItem, Paragraph, Sparkline};
use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;
use tonic::Streaming;

use capit::proto::v1 as pb;
use capit::proto::v1::watch_event::Event as E;

use crate::cmd::Client;
use crate::output::dollars_short as dollars;
use crate::watch::{clock, describe, dropped_line, period_word};

const KEEP_LINES: usize = 2000;
const MINUTE_MS: i64 = 60_000;

struct GrantRow {
    name: String,
    provider: String,
    spent: Decimal,
    cap: Decimal,
    reserved: Decimal,
    period: String,
    state: String,
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Info,
    Settled,
    Unusual,
    Refused,
    Alert,
}

struct View {
    title: String,
    grants: Vec<GrantRow>,
    /// Spend and requests per minute over the last hour: (minute start in ms, spent, requests).
    minutes: VecDeque<(i64, Decimal, u64)>,
    /// Settlement times of the last minute, per grant, for requests per minute.
    recent: HashMap<String, VecDeque<i64>>,
    lines: VecDeque<(Kind, String)>,
    /// The highest alert threshold each grant reached while watched, kept beside its bar.
    alerts: HashMap<String, u32>,
    dropped: u64,
    scroll: usize,
    ended: Option<String>,
}

fn dec(text: &str) -> Decimal {
    text.parse().unwrap_or_default()
}

impl View {
    fn new() -> View {
        View {
            title: "capit watch".into(),
            grants: Vec::new(),
            minutes: VecDeque::new(),
            recent: HashMap::new(),
            lines: VecDeque::new(),
            alerts: HashMap::new(),
            dropped: 0,
            scroll: 0,
            ended: None,
        }
    }

    fn push(&mut self, kind: Kind, text: String) {
        self.lines.push_front((kind, text));
        self.lines.truncate(KEEP_LINES);
        if self.scroll > 0 {
            self.scroll = (self.scroll + 1).min(self.lines.len().saturating_sub(1));
        }
    }

    fn set_grants(&mut self, grants: Vec<pb::Grant>) {
        self.grants = grants
            .into_iter()
            .filter(|g| g.state != "revoked")
            .map(|g| GrantRow {
                name: g.name,
                provider: g.provider,
                spent: dec(&g.spent),
                cap: dec(&g.cap),
                reserved: dec(&g.reserved),
                period: g.period,
                state: g.state,
            })
            .collect();
    }

    fn add_to_minute(&mut self, at_ms: i64, cost: Decimal) {
        let start = at_ms.div_euclid(MINUTE_MS) * MINUTE_MS;
        match self.minutes.back_mut() {
            Some(last) if last.0 == start => {
                last.1 += cost;
                last.2 += 1;
            }
            _ => {
                let mut next = self.minutes.back().map_or(start, |last| last.0 + MINUTE_MS);
                while next < start {
                    self.minutes.push_back((next, Decimal::ZERO, 0));
                    next += MINUTE_MS;
                }
                self.minutes.push_back((start, cost, 1));
            }
        }
        while self.minutes.len() > 60 {
            self.minutes.pop_front();
        }
    }

    fn apply(&mut self, event: pb::WatchEvent) {
        if event.dropped > 0 {
            self.dropped += event.dropped;
            self.push(Kind::Unusual, dropped_line(event.dropped));
        }
        let line = format!("{} {}", clock(event.at_ms), describe(&event));
        match &event.event {
            Some(E::Hello(h)) => {
                self.title = format!("capit watch · capitd {} · proxy http://{}", h.version, h.listen_addr);
                let bucket_ms = i64::from(h.bucket_seconds.max(1)) * 1000;
                for (i, (spent, requests)) in h.spent.iter().zip(&h.requests).enumerate() {
                    self.minutes.push_back((h.history_start * 1000 + i as i64 * bucket_ms, dec(spent), *requests));
                }
                self.push(Kind::Info, line);
            }
            Some(E::Settled(s)) => {
                self.add_to_minute(event.at_ms, dec(&s.cost));
                self.recent.entry(s.grant.clone()).or_default().push_back(event.at_ms);
                if let Some(g) = self.grants.iter_mut().find(|g| g.name == s.grant) {
                    (g.spent, g.cap, g.reserved) = (dec(&s.spent), dec(&s.cap), dec(&s.reserved));
                }
                let kind = if s.status == "metered" { Kind::Settled } else { Kind::Unusual };
                self.push(kind, line);
            }
            Some(E::Refused(_)) => self.push(Kind::Refused, line),
            Some(E::Alert(a)) => {
                let highest = self.alerts.entry(a.grant.clone()).or_default();
                *highest = (*highest).max(a.percent);
                self.push(Kind::Alert, line);
            }
            None => {}
        }
    }

    fn requests_per_minute(&mut self, grant: Option<&str>, now_ms: i64) -> usize {
        for times in self.recent.values_mut() {
            while times.front().is_some_and(|t| *t <= now_ms - MINUTE_MS) {
                times.pop_front();
            }
        }
        match grant {
            Some(name) => self.recent.get(name).map_or(0, VecDeque::len),
            None => self.recent.values().map(VecDeque::len).sum(),
        }
    }

    fn render(&mut self, frame: &mut Frame) {
        let now_ms = chrono::Utc::now().timestamp_millis();
        let grant_rows = self.grants.len().max(1) as u16;
        let [title, grants, spark, list, help] = Layout::vertical([
            Constraint::Length(1),
            Constraint::Length(grant_rows + 2),
            Constraint::Length(6),
            Constraint::Min(3),
            Constraint::Length(1),
        ])
        .areas(frame.area());

        let rpm = self.requests_per_minute(None, now_ms);
        let hour: Decimal = self.minutes.iter().map(|m| m.1).sum();
        let mut head = format!("{} · {rpm} req/min · {} in the last hour", self.title, dollars(&hour.to_string()));
        if self.dropped > 0 {
            head.push_str(&format!(" · {} events dropped", self.dropped));
        }
        if let Some(why) = &self.ended {
            head.push_str(&format!(" · {why}"));
        }
        frame.render_widget(Paragraph::new(head).style(Style::new().add_modifier(Modifier::BOLD)), title);

        let block = Block::bordered().title(" grants: spent / cap this period, held by requests in flight ");
        let inner = block.inner(grants);
        frame.render_widget(block, grants);
        if self.grants.is_empty() {
            frame.render_widget(Paragraph::new("no active grants; make one with: capitctl grant <agent> <amount>"), inner);
        }
        let rows = Layout::vertical(vec![Constraint::Length(1); self.grants.len()]).split(inner);
        let per_grant: Vec<usize> = self
            .grants
            .iter()
            .map(|g| g.name.clone())
            .collect::<Vec<_>>()
            .iter()
            .map(|n| self.requests_per_minute(Some(n), now_ms))
            .collect();
        for ((g, area), rpm) in self.grants.iter().zip(rows.iter()).zip(per_grant) {
            render_grant(frame, *area, g, rpm, self.alerts.get(&g.name).copied());
        }

        let data: Vec<u64> = self.minutes.iter().map(|m| (m.1 * Decimal::from(1_000_000)).round().to_u64().unwrap_or(0)).collect();
        let peak = self.minutes.iter().map(|m| m.1).max().unwrap_or_default();
        let spark_block = Block::bordered().title(format!(" spend per minute, last hour (peak {}) ", dollars(&peak.to_string())));
        frame.render_widget(Sparkline::default().block(spark_block).data(&data).style(Style::new().fg(Color::Cyan)), spark);

        let height = list.height.saturating_sub(2) as usize;
        self.scroll = self.scroll.min(self.lines.len().saturating_sub(1));
        let items: Vec<ListItem> = self
            .lines
            .iter()
            .skip(self.scroll)
            .take(height)
            .map(|(kind, text)| {
                let style = match kind {
                    Kind::Info | Kind::Settled => Style::new(),
                    Kind::Unusual => Style::new().fg(Color::Magenta),
                    Kind::Refused => Style::new().fg(Color::Red),
                    Kind::Alert => Style::new().fg(Color::Yellow).add_modifier(Modifier::BOLD),
                };
                ListItem::new(Line::from(Span::styled(text.clone(), style)))
            })
            .collect();
        let title = if self.scroll > 0 {
            format!(" requests and refusals ({} newer above) ", self.scroll)
        } else {
            " requests and refusals ".to_string()
        };
        frame.render_widget(List::new(items).block(Block::bordered().title(title)), list);
        frame.render_widget(Paragraph::new("q quits · ↑↓ PgUp PgDn scroll · Home newest").style(Style::new().fg(Color::DarkGray)), help);
    }
}

fn render_grant(frame: &mut Frame, area: Rect, g: &GrantRow, rpm: usize, alert: Option<u32>) {
    let [name, bar, numbers] = Layout::horizontal([Constraint::Length(22), Constraint::Min(10), Constraint::Length(68)]).areas(area);
    frame.render_widget(Paragraph::new(format!("{} ({})", g.name, g.provider)), name);
    let ratio = if g.cap > Decimal::ZERO { (g.spent / g.cap).min(Decimal::ONE).to_f64().unwrap_or(0.0) } else { 0.0 };
    let colour = match g.state.as_str() {
        "exhausted" | "expired" => Color::Red,
        _ if ratio >= 0.8 => Color::Yellow,
        _ => Color::Green,
    };
    let percent = if g.cap > Decimal::ZERO { (g.spent * Decimal::ONE_HUNDRED / g.cap).round() } else { Decimal::ZERO };
    frame.render_widget(
        Gauge::default().ratio(ratio).label(format!("{percent}%")).gauge_style(Style::new().fg(colour)).use_unicode(true),
        bar,
    );
    let held = if g.reserved > Decimal::ZERO { format!(" held {}", dollars(&g.reserved.to_string())) } else { String::new() };
    let mut spans = vec![Span::raw(format!(
        " {} / {} {}{held} · {rpm} req/min",
        dollars(&g.spent.to_string()),
        dollars(&g.cap.to_string()),
        period_word(&g.period)
    ))];
    if let Some(percent) = alert {
        spans.push(Span::styled(format!(" · alert {percent}%"), Style::new().fg(Color::Yellow).add_modifier(Modifier::BOLD)));
    }
    frame.render_widget(Paragraph::new(Line::from(spans)), numbers);
}

pub async fn run(mut client: Client, mut stream: Streaming<pb::WatchEvent>) -> anyhow::Result<()> {
    let mut view = View::new();
    if let Ok(reply) = client.list_grants(pb::ListGrantsRequest { include_revoked: false }).await {
        view.set_grants(reply.into_inner().grants);
    }
    let (keys_tx, mut keys) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        while let Ok(event) = event::read() {
            if keys_tx.send(event).is_err() {
                break;
            }
        }
    });
    let mut terminal = ratatui::try_init()?;
    let mut redraw = tokio::time::interval(Duration::from_millis(200));
    let mut refresh = tokio::time::interval(Duration::from_secs(2));
    let mut dirty = true;
    let result: anyhow::Result<()> = loop {
        tokio::select! {
            message = stream.message(), if view.ended.is_none() => {
                match message {
                    Ok(Some(event)) => view.apply(event),
                    Ok(None) => view.ended = Some("capitd stopped".into()),
                    Err(status) => view.ended = Some(format!("the stream broke: {}", status.message())),
                }
                dirty = true;
            }
            Some(key) = keys.recv() => {
                if let Event::Key(key) = key && key.kind == KeyEventKind::Press {
                    let page = terminal.size().map_or(10, |s| s.height.saturating_sub(12).max(1) as usize);
                    match key.code {
                        KeyCode::Char('q') | KeyCode::Esc => break Ok(()),
                        KeyCode::Char('c') if key.modifiers.contains(KeyModifiers::CONTROL) => break Ok(()),
                        KeyCode::Up => view.scroll = view.scroll.saturating_sub(1),
                        KeyCode::Down => view.scroll += 1,
                        KeyCode::PageUp => view.scroll = view.scroll.saturating_sub(page),
                        KeyCode::PageDown => view.scroll += page,
                        KeyCode::Home => view.scroll = 0,
                        _ => {}
                    }
                }
                dirty = true;
            }
            _ = refresh.tick(), if view.ended.is_none() => {
                if let Ok(reply) = client.list_grants(pb::ListGrantsRequest { include_revoked: false }).await {
                    view.set_grants(reply.into_inner().grants);
                    dirty = true;
                }
            }
            _ = redraw.tick() => {
                if dirty && let Err(e) = terminal.draw(|frame| view.render(frame)) {
                    break Err(e.into());
                }
                dirty = false;
            }
        }
    };
    ratatui::restore();
    result
}
