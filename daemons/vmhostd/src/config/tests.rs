use super::*;

fn load(text: &str) -> Result<Config, ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vmhostd.toml");
    std::fs::write(&path, text).unwrap();
    Config::load_with_table(&path).map(|(config, _)| config)
}

const MINIMAL: &str = r#"
    state_dir = "/var/lib/vmhost"
    [capacity]
    vcpus = 8
    memory_mib = 16384
"#;

#[test]
fn minimal_config_gets_defaults() {
    let config = load(MINIMAL).unwrap();
    assert_eq!(config.accel, AccelChoice::Auto);
    assert_eq!(config.cu_shape(), CuShape::default());
    assert_eq!(config.network, NetworkConfig::None);
    assert_eq!(config.capacity().memory_bytes, 16 << 30);
}

/// What the Debian package installs as /etc/vmhost/vmhostd.toml.
const PACKAGED: &str = include_str!("../../package/vmhostd.toml");

#[test]
fn the_packaged_config_parses_as_is_and_with_every_commented_key_set() {
    let config = load(PACKAGED).unwrap();
    assert_eq!(
        config.vsock_backend,
        Path::new("/usr/libexec/vmhost/vhost-device-vsock")
    );
    // A commented line that is TOML on its own is a key or a table to uncomment.
    let uncommented: String = PACKAGED
        .lines()
        .map(|line| match line.strip_prefix("# ") {
            Some(setting) if toml::from_str::<toml::Table>(setting).is_ok() => setting,
            _ => line,
        })
        .flat_map(|line| [line, "\n"])
        .collect();
    let full = load(&uncommented).unwrap();
    assert!(full.fleet.is_some() && full.images.contains_key("test"));
    assert_eq!(full.capacity.disk_gib, Some(2000));
}

#[test]
fn full_config_parses() {
    let config = load(
        r#"
        host_name = "host-a"
        state_dir = "/var/lib/vmhost"
        api_socket = "/run/vmhost/api.sock"
        accel = "tcg"
        [capacity]
        vcpus = 4
        memory_mib = 8192
        [compute_unit]
        vcpus = 1
        memory_mib = 1024
        [network]
        mode = "tap"
        bridge = "br0"
        [timeouts]
        hotplug_secs = 5
        [images.test]
        kernel = "/img/vmlinuz"
        initrd = "/img/initrd.img"
        "#,
    )
    .unwrap();
    assert_eq!(config.accel, AccelChoice::Tcg);
    assert_eq!(
        config.network,
        NetworkConfig::Tap {
            bridge: "br0".into()
        }
    );
    assert_eq!(config.timeouts.hotplug_secs, 5);
    assert_eq!(config.timeouts.qmp_secs, 10);
    assert!(config.images["test"]
        .cmdline
        .contains("memhp_default_state=online_movable"));
}

#[test]
fn errors_are_one_clear_line() {
    let cases = [
        (
            MINIMAL.replace("vcpus = 8", "vcpus = 8\ncolour = 1"),
            "unknown field",
        ),
        (
            MINIMAL.replace("memory_mib = 16384", "memory_mib = \"lots\""),
            "invalid type",
        ),
        (
            MINIMAL.replace("vcpus = 8", "vcpus = 0"),
            "must be positive",
        ),
        (
            format!("{MINIMAL}\n[compute_unit]\nmemory_mib = 1000"),
            "multiple of 512",
        ),
        (MINIMAL.replace("/var/lib/vmhost", "relative"), "absolute"),
        ("state_dir = ".to_string(), "invalid config"),
        (format!("accel = \"xen\"\n{MINIMAL}"), "unknown variant"),
        (
            format!("{MINIMAL}\n[fleet]\ncluster = \"c\"\nlisten = \"0.0.0.0:7100\"\ncredentials = \"/etc/vmhost/fleet\""),
            "concrete address",
        ),
        (
            format!("{MINIMAL}\n[fleet]\ncluster = \"c\"\nlisten = \"10.0.0.1:7100\"\ncredentials = \"/f\"\nwatermark = 1.5"),
            "watermark",
        ),
    ];
    for (text, expected) in cases {
        let message = load(&text).unwrap_err().to_string();
        assert!(message.contains(expected), "{message:?} lacks {expected:?}");
        assert!(!message.contains('\n'), "multi-line error: {message:?}");
    }
}

#[test]
fn missing_file_names_the_path() {
    let message = Config::load_with_table(Path::new("/nonexistent/vmhostd.toml"))
        .unwrap_err()
        .to_string();
    assert!(message.contains("/nonexistent/vmhostd.toml"), "{message}");
}
