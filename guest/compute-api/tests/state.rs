use vmhost_compute_api::{parse, ComputeState, ComputeStatus, ErrorReply};
use ComputeState::*;

#[test]
fn the_transition_table_is_exactly_the_allowed_one() {
    let allowed = [
        (Empty, ConfigurationPending),
        (Empty, Init),
        (Empty, TerminationPending),
        (ConfigurationPending, Configuration),
        (Configuration, Running),
        (Configuration, Failed),
        (Init, Running),
        (Init, Failed),
        (Running, ConfigurationPending),
        (Running, TerminationPending),
        (Running, Failed),
        (Failed, ConfigurationPending),
        (TerminationPending, Terminated),
    ];
    for from in ComputeState::ALL {
        for to in ComputeState::ALL {
            assert_eq!(
                from.can_go_to(to),
                allowed.contains(&(from, to)),
                "{from} -> {to}"
            );
        }
    }
}

#[test]
fn states_are_snake_case_in_json_and_display() {
    for state in ComputeState::ALL {
        let json = serde_json::to_string(&state).unwrap();
        assert_eq!(json, format!("\"{state}\""));
        assert_eq!(serde_json::from_str::<ComputeState>(&json).unwrap(), state);
    }
    assert_eq!(
        serde_json::to_string(&ConfigurationPending).unwrap(),
        "\"configuration_pending\""
    );
}

#[test]
fn status_round_trips_and_reads_older_replies() {
    let status = ComputeStatus {
        state: Failed,
        error: Some("postgres exited".into()),
        start_time_ms: 1_700_000_000_000,
        last_active_ms: Some(1_700_000_001_000),
        build_tag: "v1".into(),
        spec_format_version: Some(1),
    };
    let json = serde_json::to_string(&status).unwrap();
    assert_eq!(
        serde_json::from_str::<ComputeStatus>(&json).unwrap(),
        status
    );
    let older = r#"{"state":"running","start_time_ms":1,"build_tag":"t"}"#;
    let status: ComputeStatus = serde_json::from_str(older).unwrap();
    assert_eq!(
        (status.state, status.error, status.spec_format_version),
        (Running, None, None)
    );
}

#[test]
fn error_reply_lists_a_refused_spec_s_errors() {
    let errors = parse(br#"{"format_version": 7}"#).unwrap_err();
    let reply = ErrorReply::invalid_spec(&errors);
    let json = serde_json::to_value(&reply).unwrap();
    assert_eq!(json["error"], "invalid compute spec");
    assert_eq!(json["errors"].as_array().unwrap().len(), 1);
    assert_eq!(serde_json::from_value::<ErrorReply>(json).unwrap(), reply);
    let plain = serde_json::to_string(&ErrorReply::new("not found")).unwrap();
    assert_eq!(plain, r#"{"error":"not found"}"#);
}
