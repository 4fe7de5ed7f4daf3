//! Replays the JSONL scenarios in `director/src/ha/scenarios/`: one step per line,
//! `{"at": <ms since start>, "do": <step>}`. Before each step the machine's timers run up to `at`.
//! Steps: `Start` (config, boot id, key as text), `Peer` (a heartbeat from the simulated peer, encoded with
//! the shared key or `key` when given), `Input` (any [`Input`]), `Expect` (the actions emitted since the
//! previous `Expect`, exactly). Lines starting with `//` are comments.

use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::ha::{Action, Ha, HaConfig, Heartbeat, Input};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    at: f64,
    #[serde(rename = "do")]
    step: Step,
}

#[derive(Debug, Deserialize)]
enum Step {
    Start { config: HaConfig, boot_id: u64, key: String },
    Peer { path: usize, hb: Heartbeat, key: Option<String> },
    Input(Input),
    Expect(Vec<Action>),
}

fn run(name: &str, text: &str) {
    let t0 = Instant::now();
    let mut ha: Option<Ha> = None;
    let mut key = Vec::new();
    let mut actions = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let raw = raw.trim();
        if raw.is_empty() || raw.starts_with("//") {
            continue;
        }
        let where_ = format!("{name}:{}", n + 1);
        let line: Line = serde_json::from_str(raw).unwrap_or_else(|e| panic!("{where_}: {e}"));
        let now = t0 + Duration::from_secs_f64(line.at / 1000.0);
        if let Some(ha) = ha.as_mut() {
            while let Some(t) = ha.poll_timeout().filter(|t| *t <= now) {
                ha.handle_timeout(t);
                while ha.poll_transmit(t).is_some() {}
                actions.extend(std::iter::from_fn(|| ha.poll_action()));
            }
        }
        match line.step {
            Step::Start { mut config, boot_id, key: k } => {
                key = k.into_bytes();
                config.key = key.clone();
                ha = Some(Ha::new(config, boot_id, now).expect("valid scenario config"));
            }
            Step::Expect(expected) => {
                assert_eq!(std::mem::take(&mut actions), expected, "{where_}");
                continue;
            }
            Step::Peer { path, hb, key: k } => {
                let k = k.map_or_else(|| key.clone(), String::into_bytes);
                let ha = ha.as_mut().unwrap_or_else(|| panic!("{where_}: Start first"));
                ha.handle_datagram(now, path, &hb.encode(&k));
            }
            Step::Input(input) => {
                let ha = ha.as_mut().unwrap_or_else(|| panic!("{where_}: Start first"));
                ha.handle(now, input);
            }
        }
        let ha = ha.as_mut().unwrap_or_else(|| panic!("{where_}: Start first"));
        while ha.poll_transmit(now).is_some() {}
        actions.extend(std::iter::from_fn(|| ha.poll_action()));
    }
    assert!(actions.is_empty(), "{name}: actions never expected: {actions:?}");
}

#[test]
fn replay_scenario_files() {
    let files: &[(&str, &str)] = &[
        ("lone_start.jsonl", include_str!("../scenarios/lone_start.jsonl")),
        ("master_dies.jsonl", include_str!("../scenarios/master_dies.jsonl")),
        ("forged_and_replayed.jsonl", include_str!("../scenarios/forged_and_replayed.jsonl")),
        ("dual_master.jsonl", include_str!("../scenarios/dual_master.jsonl")),
    ];
    for (name, text) in files {
        run(name, text);
    }
}
