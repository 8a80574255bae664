use proptest::prelude::*;
use std::collections::BTreeMap;
use vmhost_compute_api::{
    parse, ComputeSpec, Database, Role, SpecError, RESERVED_SETTINGS, SPEC_FORMAT_VERSION,
};

const SCRAM: &str = "SCRAM-SHA-256$4096:c2FsdHNhbHRzYWx0c2FsdA==$ypeBEsobvcr6wjGzmiPcTaeG7/gUfE5yuYB3ha/uSLs=:PiPoFgA5WUoziU9lZOGxNIu9egCI1CxKy3PurtWcAJ0=";
const MD5: &str = "md54a0a68b43b6cd5cf266fa02f196e2371";

fn role(name: &str, hash: Option<&str>) -> Role {
    Role {
        name: name.into(),
        password_hash: hash.map(String::from),
    }
}

fn database(name: &str, owner: &str) -> Database {
    Database {
        name: name.into(),
        owner: owner.into(),
    }
}

fn installed() -> Vec<String> {
    vec!["pg_stat_statements".into(), "hstore".into()]
}

fn good() -> ComputeSpec {
    ComputeSpec {
        format_version: SPEC_FORMAT_VERSION,
        roles: vec![role("alice", Some(SCRAM)), role("Bob_2", Some(MD5))],
        databases: vec![database("app", "alice"), database("_reports", "Bob_2")],
        settings: BTreeMap::from([
            ("shared_buffers".into(), "128MB".into()),
            ("auto_explain.log_min_duration".into(), "1s".into()),
            ("search_path".into(), "'$user', public".into()),
        ]),
        extensions: vec!["pg_stat_statements".into()],
    }
}

/// The errors `spec` gets, as values.
fn errors(spec: &ComputeSpec) -> Vec<SpecError> {
    spec.validate(&installed())
        .expect_err("the spec should be refused")
        .errors()
        .to_vec()
}

fn one_error(spec: &ComputeSpec) -> SpecError {
    let errors = errors(spec);
    assert_eq!(errors.len(), 1, "{errors:?}");
    errors.into_iter().next().unwrap()
}

#[test]
fn a_good_spec_passes_and_round_trips() {
    let spec = good();
    spec.validate(&installed()).unwrap();
    let json = serde_json::to_vec(&spec).unwrap();
    assert_eq!(parse(&json).unwrap(), spec);
}

#[test]
fn an_empty_spec_needs_only_its_version() {
    let spec = parse(br#"{"format_version": 1}"#).unwrap();
    assert!(spec.roles.is_empty() && spec.databases.is_empty());
    spec.validate(&[]).unwrap();
}

#[test]
fn parse_refuses_unknown_fields_with_serde_s_message() {
    let error = parse(br#"{"format_version": 1, "rolez": []}"#).unwrap_err();
    let [SpecError::Malformed(message)] = error.errors() else {
        panic!("{error:?}");
    };
    assert!(message.contains("unknown field `rolez`"), "{message}");
    let error =
        parse(br#"{"format_version": 1, "roles": [{"name": "a", "password": "x"}]}"#).unwrap_err();
    assert!(
        error.to_string().contains("unknown field `password`"),
        "{error}"
    );
    assert!(parse(b"not json").is_err());
}

#[test]
fn another_format_version_is_refused_before_its_fields_are_judged() {
    let error = parse(br#"{"format_version": 2, "new_field": true}"#).unwrap_err();
    assert_eq!(error.errors(), [SpecError::UnsupportedVersion { found: 2 }]);
    let spec = ComputeSpec {
        format_version: 0,
        ..good()
    };
    assert_eq!(one_error(&spec), SpecError::UnsupportedVersion { found: 0 });
}

#[test]
fn bad_names_are_refused() {
    let long = "a".repeat(64);
    for name in [
        "", "1abc", "a-b", "a b", "é", "pg_x", "PG_x", "postgres", "Public", &long,
    ] {
        let spec = ComputeSpec {
            roles: vec![role(name, Some(SCRAM))],
            databases: vec![],
            ..good()
        };
        assert!(
            matches!(one_error(&spec), SpecError::BadName { kind: "role", .. }),
            "{name:?}"
        );
    }
    for name in ["template1", "postgres", "pg_catalog", "x;drop"] {
        let spec = ComputeSpec {
            databases: vec![database(name, "alice")],
            ..good()
        };
        assert!(
            matches!(
                one_error(&spec),
                SpecError::BadName {
                    kind: "database",
                    ..
                }
            ),
            "{name:?}"
        );
    }
    let longest = "a".repeat(63);
    let spec = ComputeSpec {
        roles: vec![role(&longest, Some(SCRAM))],
        databases: vec![database(&longest, &longest)],
        ..good()
    };
    spec.validate(&installed()).unwrap();
}

#[test]
fn duplicates_are_refused() {
    let mut spec = good();
    spec.roles.push(role("alice", Some(MD5)));
    spec.databases.push(database("app", "Bob_2"));
    assert_eq!(
        errors(&spec),
        [
            SpecError::DuplicateRole("alice".into()),
            SpecError::DuplicateDatabase("app".into())
        ]
    );
}

#[test]
fn an_owner_must_be_a_role_of_the_spec() {
    let mut spec = good();
    spec.databases.push(database("other", "postgres"));
    assert_eq!(
        one_error(&spec),
        SpecError::UnknownOwner {
            database: "other".into(),
            owner: "postgres".into()
        }
    );
}

#[test]
fn a_role_needs_a_password_hash_never_a_clear_password() {
    let spec = ComputeSpec {
        roles: vec![role("alice", None)],
        databases: vec![],
        ..good()
    };
    assert_eq!(
        one_error(&spec),
        SpecError::MissingPasswordHash("alice".into())
    );
    let broken = [
        "hunter2",
        "md5",
        "MD54A0A68B43B6CD5CF266FA02F196E2371",
        "md54a0a68b43b6cd5cf266fa02f196e237",
        "md54a0a68b43b6cd5cf266fa02f196e2371x",
        "SCRAM-SHA-256$4096:c2FsdA==$a:b",
        "SCRAM-SHA-256$0:c2FsdA==$ypeBEsobvcr6wjGzmiPcTaeG7/gUfE5yuYB3ha/uSLs=:PiPoFgA5WUoziU9lZOGxNIu9egCI1CxKy3PurtWcAJ0=",
        "SCRAM-SHA-256$-1:c2FsdA==$ypeBEsobvcr6wjGzmiPcTaeG7/gUfE5yuYB3ha/uSLs=:PiPoFgA5WUoziU9lZOGxNIu9egCI1CxKy3PurtWcAJ0=",
        "SCRAM-SHA-256$4096:$ypeBEsobvcr6wjGzmiPcTaeG7/gUfE5yuYB3ha/uSLs=:PiPoFgA5WUoziU9lZOGxNIu9egCI1CxKy3PurtWcAJ0=",
        "SCRAM-SHA-256$4096:c2FsdA=$ypeBEsobvcr6wjGzmiPcTaeG7/gUfE5yuYB3ha/uSLs=:PiPoFgA5WUoziU9lZOGxNIu9egCI1CxKy3PurtWcAJ0=",
        "SCRAM-SHA-256$4096:c2FsdA==$ypeBEsobvcr6wjGzmiPcTaeG7/gUfE5yuYB3ha/uS==:PiPoFgA5WUoziU9lZOGxNIu9egCI1CxKy3PurtWcAJ0=",
        "SCRAM-SHA-1$4096:c2FsdA==$ypeBEsobvcr6wjGzmiPcTaeG7/gUfE5yuYB3ha/uSLs=:PiPoFgA5WUoziU9lZOGxNIu9egCI1CxKy3PurtWcAJ0=",
    ];
    for hash in broken {
        let spec = ComputeSpec {
            roles: vec![role("alice", Some(hash))],
            databases: vec![],
            ..good()
        };
        assert_eq!(
            one_error(&spec),
            SpecError::BadPasswordHash("alice".into()),
            "{hash}"
        );
    }
    // The hash never appears in an error or a debug print.
    let spec = ComputeSpec {
        roles: vec![role("alice", Some("hunter2"))],
        databases: vec![],
        ..good()
    };
    let text = spec.validate(&installed()).unwrap_err().to_string();
    assert!(!text.contains("hunter2") && !format!("{spec:?}").contains("hunter2"));
}

#[test]
fn extensions_must_be_installed() {
    let mut spec = good();
    spec.extensions.push("neon".into());
    assert_eq!(one_error(&spec), SpecError::UnknownExtension("neon".into()));
}

#[test]
fn setting_keys_and_values_are_checked() {
    for key in ["Shared_buffers", "1x", "a-b", "", "a b", "work mem"] {
        let mut spec = good();
        spec.settings.insert(key.into(), "1".into());
        assert_eq!(
            one_error(&spec),
            SpecError::BadSettingKey(key.into()),
            "{key:?}"
        );
    }
    for key in RESERVED_SETTINGS {
        let mut spec = good();
        spec.settings.insert(key.to_string(), "1".into());
        let error = one_error(&spec);
        assert_eq!(error, SpecError::ReservedSetting(key.to_string()));
        assert!(
            error.to_string().contains("listen_addresses, port"),
            "{error}"
        );
    }
    for value in ["a\nb", "a\rb", "a\0b"] {
        let mut spec = good();
        spec.settings
            .insert("application_name".into(), value.into());
        assert_eq!(
            one_error(&spec),
            SpecError::BadSettingValue("application_name".into())
        );
    }
}

#[test]
fn every_error_is_listed_one_per_line() {
    let spec = ComputeSpec {
        format_version: 1,
        roles: vec![
            role("pg_admin", Some(SCRAM)),
            role("carol", None),
            role("carol", Some("secret")),
        ],
        databases: vec![database("app", "dave")],
        settings: BTreeMap::from([
            ("port".into(), "5433".into()),
            ("Bad".into(), "x".into()),
            ("application_name".into(), "x\n".into()),
        ]),
        extensions: vec!["postgis".into()],
    };
    let error = spec.validate(&installed()).unwrap_err();
    assert_eq!(error.errors().len(), 9, "{error}");
    let text = error.to_string();
    assert_eq!(text.lines().count(), 9, "{text}");
    for needle in [
        "role name \"pg_admin\"",
        "role \"carol\": no password hash",
        "role \"carol\" is listed more than once",
        "role \"carol\": the password hash",
        "owner \"dave\"",
        "extension \"postgis\"",
        "setting \"port\"",
        "setting \"Bad\": a key",
        "setting \"application_name\": the value",
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
}

#[test]
fn a_hostile_name_is_cut_short_in_errors() {
    let name = "x".repeat(100_000);
    let spec = ComputeSpec {
        roles: vec![role(&name, Some(SCRAM))],
        databases: vec![],
        ..good()
    };
    assert!(spec.validate(&installed()).unwrap_err().to_string().len() < 200);
}

proptest! {
    #[test]
    fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = parse(&bytes);
    }

    #[test]
    fn parse_then_validate_never_panics(
        name in "\\PC{0,80}",
        hash in "\\PC{0,120}",
        key in "\\PC{0,20}",
        value in "\\PC{0,20}",
    ) {
        let json = serde_json::json!({
            "format_version": 1,
            "roles": [{"name": name, "password_hash": hash}],
            "databases": [{"name": name, "owner": name}],
            "settings": {key: value},
            "extensions": [name],
        });
        let spec = parse(json.to_string().as_bytes()).unwrap();
        let _ = spec.validate(&installed());
    }
}
