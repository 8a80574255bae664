//! The configuration files computectl owns in PGDATA, rendered as text. computectl never
//! edits initdb's postgresql.conf beyond one include line, so a Postgres upgrade's defaults
//! stay readable, and everything it sets is in one file it rewrites whole.

use std::collections::BTreeMap;

/// Where Postgres puts its unix socket, and where computectl and `retune` connect.
pub const SOCKET_DIR: &str = "/run/postgresql";
pub const PG_PORT: u16 = 5432;
/// computectl's file in PGDATA, included from postgresql.conf.
pub const COMPUTE_CONF: &str = "compute.conf";
const INCLUDE_LINE: &str = "include = 'compute.conf'";

/// Client authentication: the superuser only through the unix socket as the OS user
/// `postgres` or root (computectl, `retune`); every other role by password.
pub const HBA_CONF: &str = "\
# Written by computectl; rewritten on every configure.
local   all   postgres                peer map=computectl
local   all   all                     scram-sha-256
host    all   postgres  0.0.0.0/0     reject
host    all   postgres  ::/0          reject
host    all   all       0.0.0.0/0     scram-sha-256
host    all   all       ::/0          scram-sha-256
";

/// computectl runs as root and connects as `postgres` through peer authentication.
pub const IDENT_CONF: &str = "\
# Written by computectl; rewritten on every configure.
computectl   root       postgres
computectl   postgres   postgres
";

/// compute.conf: where Postgres listens, then the spec's settings. Keys and values were
/// validated (no reserved keys, no line breaks or NULs).
pub fn compute_conf(settings: &BTreeMap<String, String>) -> String {
    let mut text = format!(
        "# Written by computectl; rewritten on every configure.\n\
         listen_addresses = '*'\n\
         port = {PG_PORT}\n\
         unix_socket_directories = {}\n\
         # From the compute spec.\n",
        conf_quote(SOCKET_DIR)
    );
    for (key, value) in settings {
        text.push_str(&format!("{key} = {}\n", conf_quote(value)));
    }
    text
}

/// postgresql.conf with the include of compute.conf at its end, or `None` if it has it.
/// Last, because the last value of a setting wins.
pub fn with_include(postgresql_conf: &str) -> Option<String> {
    if postgresql_conf.lines().any(|l| l.trim() == INCLUDE_LINE) {
        return None;
    }
    let mut text = postgresql_conf.to_string();
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str("# computectl's settings; keep this line last.\n");
    text.push_str(INCLUDE_LINE);
    text.push('\n');
    Some(text)
}

/// A quoted postgresql.conf value: the file's lexer reads backslash escapes inside quotes,
/// so backslashes are doubled as well as quotes.
fn conf_quote(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compute_conf_puts_the_listen_settings_first_and_quotes_values() {
        let settings = BTreeMap::from([
            ("shared_buffers".to_string(), "256MB".to_string()),
            ("search_path".to_string(), "'$user', public".to_string()),
            ("log_line_prefix".to_string(), "a\\b".to_string()),
        ]);
        assert_eq!(
            compute_conf(&settings),
            "# Written by computectl; rewritten on every configure.\n\
             listen_addresses = '*'\n\
             port = 5432\n\
             unix_socket_directories = '/run/postgresql'\n\
             # From the compute spec.\n\
             log_line_prefix = 'a\\\\b'\n\
             search_path = '''$user'', public'\n\
             shared_buffers = '256MB'\n"
        );
    }

    #[test]
    fn the_include_is_added_once_at_the_end() {
        let original = "max_connections = 100\n#include = 'compute.conf'";
        let included = with_include(original).unwrap();
        assert!(included.starts_with("max_connections = 100\n#include"));
        assert!(included.ends_with("\ninclude = 'compute.conf'\n"));
        assert_eq!(with_include(&included), None);
        assert_eq!(
            with_include("").unwrap(),
            "# computectl's settings; keep this line last.\ninclude = 'compute.conf'\n"
        );
    }

    #[test]
    fn hba_lets_only_local_peers_be_the_superuser() {
        let rules: Vec<Vec<&str>> = HBA_CONF
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(
            rules[0],
            ["local", "all", "postgres", "peer", "map=computectl"]
        );
        assert!(rules
            .iter()
            .filter(|r| r[0] == "host" && r[2] == "postgres")
            .all(|r| r[4] == "reject"));
        assert!(IDENT_CONF.contains("computectl   root       postgres"));
    }
}
