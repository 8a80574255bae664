use super::*;
use crate::testing::{compute, wait_for, GOOD_SPEC};

#[tokio::test]
async fn configure_from_empty_starts_postgres_and_keeps_the_spec() {
    let dir = tempfile::tempdir().unwrap();
    let (compute, postgres) = compute(&dir);
    assert_eq!(compute.status().state, Empty);
    let status = compute.configure(GOOD_SPEC.into()).await.unwrap();
    assert_eq!((status.state, status.error), (Running, None));
    assert_eq!(status.spec_format_version, Some(1));
    assert_eq!(
        postgres.take_calls(),
        ["prepare", "start", "wait_ready", "reconcile"]
    );
    let saved = vmhost_compute_api::parse(&std::fs::read(dir.path().join("spec.json")).unwrap());
    assert_eq!(Some(saved.unwrap()), compute.spec());
}

#[tokio::test]
async fn a_live_reconfigure_reloads_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (compute, postgres) = compute(&dir);
    compute.configure(GOOD_SPEC.into()).await.unwrap();
    postgres.take_calls();
    let status = compute.configure(GOOD_SPEC.into()).await.unwrap();
    assert_eq!(status.state, Running);
    assert_eq!(postgres.take_calls(), ["prepare", "reload", "reconcile"]);
}

#[tokio::test]
async fn an_invalid_spec_fails_the_compute_until_a_good_one_comes() {
    let dir = tempfile::tempdir().unwrap();
    let (compute, postgres) = compute(&dir);
    compute.configure(GOOD_SPEC.into()).await.unwrap();
    postgres.take_calls();
    let bad = br#"{"format_version": 1, "roles": [{"name": "pg_x"}], "extensions": ["postgis"]}"#;
    let Err(ComputeError::InvalidSpec(errors)) = compute.configure(bad.to_vec()).await else {
        panic!("the spec should be refused");
    };
    assert_eq!(errors.errors().len(), 3, "{errors}");
    let status = compute.status();
    assert_eq!(status.state, Failed);
    let error = status.error.unwrap();
    assert!(
        error.contains("pg_x") && error.contains("postgis"),
        "{error}"
    );
    // Nothing was applied, and the spec in force is still the good one.
    assert!(postgres.take_calls().is_empty());
    assert_eq!(compute.spec().unwrap().roles[0].name, "alice");
    // Postgres kept running, so the recovery reloads it.
    let status = compute.configure(GOOD_SPEC.into()).await.unwrap();
    assert_eq!(status.state, Running);
    assert_eq!(postgres.take_calls(), ["prepare", "reload", "reconcile"]);
}

#[tokio::test]
async fn a_postmaster_exit_fails_the_compute_and_a_configure_restarts_it() {
    let dir = tempfile::tempdir().unwrap();
    let (compute, postgres) = compute(&dir);
    compute.configure(GOOD_SPEC.into()).await.unwrap();
    postgres.take_calls();
    postgres.crash("postgres exited (signal: 9 (SIGKILL))");
    wait_for(&compute, Failed).await;
    assert!(compute.status().error.unwrap().contains("SIGKILL"));
    // Not restarted on its own.
    assert!(postgres.take_calls().is_empty());
    compute.configure(GOOD_SPEC.into()).await.unwrap();
    assert_eq!(
        postgres.take_calls(),
        ["prepare", "start", "wait_ready", "reconcile"]
    );
}

#[tokio::test]
async fn a_failed_apply_keeps_its_whole_cause_chain() {
    let dir = tempfile::tempdir().unwrap();
    let (compute, postgres) = compute(&dir);
    postgres.fail_reconcile(true);
    let Err(ComputeError::Failed(error)) = compute.configure(GOOD_SPEC.into()).await else {
        panic!("the configure should fail");
    };
    let status = compute.status();
    assert_eq!(status.state, Failed);
    assert_eq!(status.error.as_deref(), Some(format!("{error:#}").as_str()));
    assert!(
        status.error.as_deref()
            == Some("cannot apply the roles and databases: db error: ERROR: role \"old\" cannot be dropped"),
        "{status:?}"
    );
}

#[tokio::test]
async fn init_starts_from_a_stored_spec() {
    let dir = tempfile::tempdir().unwrap();
    let (compute, postgres) = compute(&dir);
    let source = dir.path().join("baked.json");
    std::fs::write(&source, GOOD_SPEC).unwrap();
    compute.clone().init(source).await;
    assert_eq!(compute.status().state, Running);
    assert_eq!(
        postgres.take_calls(),
        ["prepare", "start", "wait_ready", "reconcile"]
    );
}

#[tokio::test]
async fn init_with_a_bad_stored_spec_fails_and_a_configure_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let (compute, _postgres) = compute(&dir);
    let source = dir.path().join("baked.json");
    std::fs::write(
        &source,
        r#"{"format_version": 1, "roles": [{"name": "a"}]}"#,
    )
    .unwrap();
    compute.clone().init(source).await;
    let status = compute.status();
    assert_eq!(status.state, Failed);
    assert!(status.error.unwrap().contains("no password hash"));
    compute.configure(GOOD_SPEC.into()).await.unwrap();
    assert_eq!(compute.status().state, Running);
}

#[tokio::test]
async fn terminate_stops_postgres_for_good() {
    let dir = tempfile::tempdir().unwrap();
    let (compute, postgres) = compute(&dir);
    compute.configure(GOOD_SPEC.into()).await.unwrap();
    postgres.take_calls();
    let status = compute.terminate().await.unwrap();
    assert_eq!(status.state, Terminated);
    assert_eq!(postgres.take_calls(), ["stop"]);
    // Asking again is answered, not refused; configuring is refused.
    assert_eq!(compute.terminate().await.unwrap().state, Terminated);
    let Err(ComputeError::Conflict { state, .. }) = compute.configure(GOOD_SPEC.into()).await
    else {
        panic!("a terminated compute cannot be configured");
    };
    assert_eq!(state, Terminated);
    // The postmaster's exit after a terminate is no failure.
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(compute.status().state, Terminated);
}

#[tokio::test]
async fn a_failed_compute_cannot_be_terminated() {
    let dir = tempfile::tempdir().unwrap();
    let (compute, _postgres) = compute(&dir);
    let _ = compute.configure(b"{}".to_vec()).await;
    assert_eq!(compute.status().state, Failed);
    assert!(matches!(
        compute.terminate().await,
        Err(ComputeError::Conflict { state: Failed, .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn the_monitor_notes_activity_while_running() {
    let dir = tempfile::tempdir().unwrap();
    let (compute, _postgres) = compute(&dir);
    tokio::spawn(compute.clone().monitor(Duration::from_secs(5)));
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(compute.status().last_active_ms, None);
    compute.configure(GOOD_SPEC.into()).await.unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(compute.status().last_active_ms.is_some());
}
