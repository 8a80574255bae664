use super::*;

#[test]
fn only_events_qapi_cannot_decode_are_dropped() {
    let known = r#"{"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}}"#;
    let unknown = r#"{"event": "NO_SUCH_EVENT", "timestamp": {"seconds": 1, "microseconds": 2}}"#;
    let odd = r#"{"event": "DEVICE_DELETED", "data": {"path": 7}, "timestamp": {"seconds": 1, "microseconds": 2}}"#;
    assert!(is_known(known));
    assert!(!is_known(unknown));
    assert!(!is_known(odd));
    assert!(is_known(r#"{"return": {}}"#));
    assert!(is_known("not json: qapi reports it"));
}

/// A QMP server that greets, then sends `events` and answers one `query-status`.
async fn serve_qmp(listener: tokio::net::UnixListener, events: Vec<&'static str>) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let (socket, _) = listener.accept().await.unwrap();
    let (read, mut write) = tokio::io::split(socket);
    let mut lines = tokio::io::BufReader::new(read).lines();
    let greeting = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 10}, "package": ""}, "capabilities": []}}"#;
    write
        .write_all(format!("{greeting}\n").as_bytes())
        .await
        .unwrap();
    while let Ok(Some(line)) = lines.next_line().await {
        let request: serde_json::Value = serde_json::from_str(&line).unwrap();
        let id = request["id"].clone();
        if request["execute"] == "query-status" {
            for event in &events {
                write
                    .write_all(format!("{event}\n").as_bytes())
                    .await
                    .unwrap();
            }
            let reply =
                serde_json::json!({"return": {"status": "running", "running": true}, "id": id});
            write
                .write_all(format!("{reply}\n").as_bytes())
                .await
                .unwrap();
        } else {
            let reply = serde_json::json!({"return": {}, "id": id});
            write
                .write_all(format!("{reply}\n").as_bytes())
                .await
                .unwrap();
        }
    }
}

#[tokio::test]
async fn an_event_qapi_does_not_know_does_not_end_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let unknown =
        r#"{"event": "NO_SUCH_EVENT", "data": {}, "timestamp": {"seconds": 1, "microseconds": 2}}"#;
    let known = r#"{"event": "RESUME", "timestamp": {"seconds": 1, "microseconds": 2}}"#;
    tokio::spawn(serve_qmp(listener, vec![unknown, known]));
    let client = QmpClient::connect(&path, Duration::from_secs(5))
        .await
        .unwrap();
    let mut events = client.subscribe();
    let status = client.execute(qapi::qmp::query_status {}).await.unwrap();
    assert!(status.running);
    let event = tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(event, Event::RESUME { .. }), "{event:?}");
    assert!(!client.is_closed());
    client.execute(qapi::qmp::query_status {}).await.unwrap();
}

#[test]
fn parses_qemu_7_2_hotpluggable_cpus_reply() {
    let reply = r#"[{"props": {"core-id": 1, "thread-id": 0, "node-id": 0, "socket-id": 0},
        "vcpus-count": 1, "type": "qemu64-x86_64-cpu"},
        {"props": {"core-id": 0, "thread-id": 0, "node-id": 0, "socket-id": 0}, "vcpus-count": 1,
        "qom-path": "/machine/unattached/device[0]", "type": "qemu64-x86_64-cpu"}]"#;
    let cpus: Vec<HotpluggableCpu> = serde_json::from_str(reply).unwrap();
    assert_eq!(cpus.len(), 2);
    assert_eq!(cpus[0].qom_path, None);
    assert_eq!(cpus[0].props.core_id, 1);
    assert_eq!(cpus[1].driver, "qemu64-x86_64-cpu");
}

#[test]
fn parses_query_migrate_and_omits_unset_parameters() {
    let reply = r#"{"status": "completed", "setup-time": 1, "downtime": 16, "total-time": 808,
        "ram": {"total": 268967936, "postcopy-requests": 0, "dirty-sync-count": 3,
        "remaining": 0, "mbps": 1059.17, "transferred": 106844548}}"#;
    let info: MigrationInfo = serde_json::from_str(reply).unwrap();
    assert_eq!(info.status, MigrationStatus::Completed);
    assert_eq!(info.downtime, Some(16));
    assert_eq!(info.ram.unwrap().dirty_sync_count, 3);
    let empty: MigrationInfo = serde_json::from_str(r#"{}"#).unwrap();
    assert_eq!(empty.status, MigrationStatus::None);
    let params = MigrateSetParameters {
        downtime_limit: Some(300),
        ..Default::default()
    };
    assert_eq!(
        serde_json::to_value(&params).unwrap(),
        serde_json::json!({"downtime-limit": 300})
    );
}

#[test]
fn cpu_device_add_flattens_props() {
    let cmd = CpuDeviceAdd {
        driver: "qemu64-x86_64-cpu".into(),
        id: "cpu1".into(),
        props: CpuProps {
            socket_id: 0,
            core_id: 1,
            thread_id: 0,
        },
    };
    let json = serde_json::to_value(&cmd).unwrap();
    assert_eq!(
        json,
        serde_json::json!({"driver": "qemu64-x86_64-cpu", "id": "cpu1",
            "socket-id": 0, "core-id": 1, "thread-id": 0})
    );
}
