//! Property loops over what QEMU's monitor lines go through: qapi's message decoder (events
//! and replies), the reply types vmm reads from a `return`, and the out-of-band monitor's
//! reply matching. Never a panic; valid replies decode to what was sent. PROPTEST_CASES sets
//! the number of cases (256 by default); `scripts/fuzz` runs more.

use proptest::collection::vec;
use proptest::prelude::*;
use qapi::qmp::{Event, QmpMessage, QmpMessageAny};
use serde::Deserialize;
use serde_json::{json, Value};
use vmm::qmp::{
    oob_outcome, MigrationInfo, QomGet, QueryBlockJobs, QueryHotpluggableCpus, QueryMigrate,
    QueryStatus,
};
use vmm::MigrationStatus;

/// A reply's `return` as command `C`'s result, the way qapi's client reads it.
fn result<C: qapi::Command>(value: &Value) -> Result<C::Ok, serde_json::Error> {
    C::Ok::deserialize(value)
}

/// Every way vmm reads one monitor line; none of it may panic. The cargo-fuzz target
/// `qmp_reply` runs this too.
pub fn decode_line(line: &[u8]) {
    if let Ok(QmpMessage::Response(reply)) = serde_json::from_slice::<QmpMessageAny>(line) {
        if let Ok(value) = reply.result() {
            let _ = result::<QueryHotpluggableCpus>(&value);
            let _ = result::<QueryStatus>(&value);
            let _ = result::<QueryMigrate>(&value);
            let _ = result::<QueryBlockJobs>(&value);
            let _ = result::<QomGet>(&value);
        }
    }
    if let Ok(reply) = serde_json::from_slice::<Value>(line) {
        let _ = oob_outcome(&reply, "oob-1");
    }
}

/// QEMU's migration status names, and some it might add.
fn status_name() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "none",
            "setup",
            "active",
            "pre-switchover",
            "device",
            "postcopy-active",
            "postcopy-paused",
            "completed",
            "failed",
            "cancelled",
        ])
        .prop_map(String::from),
        "[a-z-]{0,20}",
    ]
}

/// A `query-migrate` reply as QEMU writes it, some fields left out.
fn query_migrate() -> impl Strategy<Value = Value> {
    (
        proptest::option::of(status_name()),
        proptest::option::of((any::<[u64; 5]>(), 0.0f64..1e6)),
        proptest::option::of(any::<u64>()),
        proptest::option::of(".{0,20}"),
    )
        .prop_map(|(status, ram, downtime, error)| {
            let mut reply = json!({});
            if let Some(status) = status {
                reply["status"] = status.into();
            }
            if let Some(([transferred, remaining, total, syncs, requests], mbps)) = ram {
                reply["ram"] = json!({"transferred": transferred, "remaining": remaining,
                    "total": total, "mbps": mbps, "dirty-sync-count": syncs,
                    "postcopy-requests": requests});
            }
            if let Some(downtime) = downtime {
                reply["downtime"] = downtime.into();
            }
            if let Some(error) = error {
                reply["error-desc"] = error.into();
            }
            reply
        })
}

fn hotpluggable_cpus() -> impl Strategy<Value = Value> {
    vec(
        (any::<[i64; 3]>(), any::<bool>()).prop_map(|([socket, core, thread], plugged)| {
            let mut cpu = json!({"type": "qemu64-x86_64-cpu", "vcpus-count": 1,
                "props": {"socket-id": socket, "core-id": core, "thread-id": thread}});
            if plugged {
                cpu["qom-path"] = format!("/machine/peripheral/cpu{core}").into();
            }
            cpu
        }),
        0..8,
    )
    .prop_map(Value::Array)
}

/// A line QEMU might send: a reply to any command vmm issues, or an event.
fn monitor_line() -> impl Strategy<Value = String> {
    let reply = prop_oneof![
        query_migrate(),
        hotpluggable_cpus(),
        any::<bool>().prop_map(|running| json!({"status": "running", "running": running})),
        any::<u64>().prop_map(Value::from),
    ];
    let event = (status_name(), any::<u32>()).prop_map(|(status, seconds)| {
        json!({"event": "MIGRATION", "data": {"status": status},
            "timestamp": {"seconds": seconds, "microseconds": 0}})
    });
    prop_oneof![
        (reply, any::<u32>()).prop_map(|(value, id)| json!({"return": value, "id": id})),
        event,
        ".{0,20}".prop_map(|desc| json!({"error": {"class": "GenericError", "desc": desc}})),
    ]
    .prop_map(|line| line.to_string())
}

const JSON_BITS: &[&str] = &[
    "{", "}", "[", "]", "\"", ",", ":", "null", "-1", "1e999", "\\u0000",
];

proptest! {
    #[test]
    fn arbitrary_lines_never_panic(line in ".{0,256}") {
        decode_line(line.as_bytes());
    }

    #[test]
    fn arbitrary_bytes_never_panic(line in vec(any::<u8>(), 0..256)) {
        decode_line(&line);
    }

    /// Valid lines with pieces of JSON dropped in or cut short: never a panic.
    #[test]
    fn mutated_lines_never_panic(mut line in monitor_line(),
                                 edits in vec((any::<prop::sample::Index>(),
                                               prop::sample::select(JSON_BITS)), 1..4),
                                 keep in any::<prop::sample::Index>()) {
        for (at, bit) in &edits {
            let boundaries: Vec<usize> = line.char_indices().map(|(i, _)| i).collect();
            line.insert_str(boundaries[at.index(boundaries.len())], bit);
        }
        let cut = line.char_indices().map(|(i, _)| i).nth(keep.index(line.len() + 1));
        line.truncate(cut.unwrap_or(line.len()));
        decode_line(line.as_bytes());
    }

    /// A `query-migrate` reply reads as what it says; absent fields take their defaults.
    #[test]
    fn query_migrate_replies_decode_to_what_was_sent(reply in query_migrate(), id in any::<u32>()) {
        let line = json!({"return": reply, "id": id}).to_string();
        let Ok(QmpMessage::Response(response)) = serde_json::from_str::<QmpMessageAny>(&line) else {
            panic!("not a reply: {line}");
        };
        let info: MigrationInfo = result::<QueryMigrate>(&response.result().unwrap()).unwrap();
        let status = reply["status"].as_str().map(MigrationStatus::from).unwrap_or_default();
        prop_assert_eq!(info.status, status);
        prop_assert_eq!(info.downtime, reply["downtime"].as_u64());
        prop_assert_eq!(info.error_desc.as_deref(), reply["error-desc"].as_str());
        let ram = info.ram.unwrap_or_default();
        prop_assert_eq!(ram.transferred, reply["ram"]["transferred"].as_u64().unwrap_or(0));
        prop_assert_eq!(ram.dirty_sync_count, reply["ram"]["dirty-sync-count"].as_u64().unwrap_or(0));
    }

    #[test]
    fn hotpluggable_cpus_decode_to_what_was_sent(reply in hotpluggable_cpus()) {
        let cpus = result::<QueryHotpluggableCpus>(&reply).unwrap();
        prop_assert_eq!(cpus.len(), reply.as_array().unwrap().len());
        for (cpu, sent) in cpus.iter().zip(reply.as_array().unwrap()) {
            prop_assert_eq!(Some(cpu.props.core_id), sent["props"]["core-id"].as_i64());
            prop_assert_eq!(cpu.qom_path.as_deref(), sent["qom-path"].as_str());
        }
    }

    /// A MIGRATION event with a status QEMU knows decodes as one.
    #[test]
    fn migration_events_decode(status in status_name(), seconds in any::<u32>()) {
        let line = json!({"event": "MIGRATION", "data": {"status": status},
            "timestamp": {"seconds": seconds, "microseconds": 0}}).to_string();
        let decoded = serde_json::from_str::<QmpMessageAny>(&line);
        if !matches!(MigrationStatus::from(status.as_str()), MigrationStatus::Other(_)) {
            let is_migration = matches!(decoded, Ok(QmpMessage::Event(Event::MIGRATION { .. })));
            prop_assert!(is_migration, "{}", line);
        }
    }

    /// Any status name reads back as itself, known or not.
    #[test]
    fn migration_status_round_trips(name in ".{0,24}") {
        let status: MigrationStatus = serde_json::from_value(Value::from(name.as_str())).unwrap();
        prop_assert_eq!(serde_json::to_value(&status).unwrap(), Value::from(name));
    }

    /// The out-of-band monitor takes its own reply's result or error, and skips the others.
    #[test]
    fn oob_replies_match_their_id(value in query_migrate(), ours in any::<u16>(),
                                  theirs in any::<u16>(), desc in ".{0,20}") {
        let id = format!("oob-{ours}");
        let reply = json!({"return": value, "id": format!("oob-{theirs}")});
        let outcome = oob_outcome(&reply, &id);
        if ours == theirs {
            prop_assert_eq!(outcome, Some(Ok(value)));
        } else {
            prop_assert_eq!(outcome, None);
        }
        let error = json!({"error": {"class": "GenericError", "desc": desc}, "id": id});
        prop_assert_eq!(oob_outcome(&error, &id), Some(Err(desc)));
    }
}
