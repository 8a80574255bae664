//! Reconcile planning: from the roles and databases Postgres holds and a spec, the ordered
//! SQL that makes Postgres hold the spec. Pure, so every plan can be checked as text.
//!
//! What computectl creates carries the comment [`MANAGED_COMMENT`]; only such roles and
//! databases are ever dropped, so whatever an operator made by hand survives.

use crate::sql::{quote_ident, quote_literal};
use std::collections::BTreeSet;
use vmhost_compute_api::ComputeSpec;

pub const MANAGED_COMMENT: &str = "managed by computectl";
/// The database computectl connects to for cluster-wide statements.
pub const MAINTENANCE_DB: &str = "postgres";
/// The bootstrap superuser: never dropped, and the heir of what dropped roles owned.
pub const SUPERUSER: &str = "postgres";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExistingRole {
    pub name: String,
    pub managed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExistingDatabase {
    pub name: String,
    pub owner: String,
    pub managed: bool,
    /// `datallowconn`: false for template0, which cannot be entered.
    pub allows_connections: bool,
}

/// What Postgres holds now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Existing {
    pub roles: Vec<ExistingRole>,
    pub databases: Vec<ExistingDatabase>,
}

/// One statement and the database it runs in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub database: String,
    pub sql: String,
    /// The statement as logs and errors show it: password hashes left out.
    pub summary: String,
}

impl Step {
    fn new(database: &str, sql: String) -> Step {
        Step {
            database: database.to_string(),
            summary: sql.clone(),
            sql,
        }
    }
}

/// The statements that make `existing` hold `spec`, in the order they must run: roles
/// before the databases they own, dropped databases before their owners, and what a
/// dropped role owns handed on before it goes.
pub fn plan(existing: &Existing, spec: &ComputeSpec) -> Vec<Step> {
    let mut steps = Vec::new();
    let role_exists = |name: &str| existing.roles.iter().any(|r| r.name == name);
    for role in &spec.roles {
        let verb = if role_exists(&role.name) {
            "ALTER"
        } else {
            "CREATE"
        };
        let head = format!(
            "{verb} ROLE {} WITH LOGIN PASSWORD",
            quote_ident(&role.name)
        );
        let hash = role.password_hash.as_deref().unwrap_or_default();
        steps.push(Step {
            database: MAINTENANCE_DB.into(),
            sql: format!("{head} {}", quote_literal(hash)),
            summary: format!("{head} '…'"),
        });
        if !existing
            .roles
            .iter()
            .any(|r| r.name == role.name && r.managed)
        {
            steps.push(comment("ROLE", &role.name));
        }
    }

    let in_spec = |name: &str| spec.databases.iter().any(|d| d.name == name);
    let dropped_databases: BTreeSet<&str> = existing
        .databases
        .iter()
        .filter(|d| d.managed && !in_spec(&d.name))
        .map(|d| d.name.as_str())
        .collect();
    for name in &dropped_databases {
        steps.push(Step::new(
            MAINTENANCE_DB,
            format!("DROP DATABASE {} WITH (FORCE)", quote_ident(name)),
        ));
    }
    for database in &spec.databases {
        let (name, owner) = (quote_ident(&database.name), quote_ident(&database.owner));
        match existing.databases.iter().find(|d| d.name == database.name) {
            None => steps.push(Step::new(
                MAINTENANCE_DB,
                format!("CREATE DATABASE {name} OWNER {owner}"),
            )),
            Some(found) if found.owner != database.owner => steps.push(Step::new(
                MAINTENANCE_DB,
                format!("ALTER DATABASE {name} OWNER TO {owner}"),
            )),
            Some(_) => {}
        }
        if !existing
            .databases
            .iter()
            .any(|d| d.name == database.name && d.managed)
        {
            steps.push(comment("DATABASE", &database.name));
        }
    }

    let in_spec_roles = |name: &str| spec.roles.iter().any(|r| r.name == name);
    let dropped_roles: BTreeSet<&str> = existing
        .roles
        .iter()
        .filter(|r| r.managed && r.name != SUPERUSER && !in_spec_roles(&r.name))
        .map(|r| r.name.as_str())
        .collect();
    if !dropped_roles.is_empty() {
        drop_roles(
            existing,
            spec,
            &dropped_roles,
            &dropped_databases,
            &mut steps,
        );
    }

    for database in &spec.databases {
        for extension in &spec.extensions {
            steps.push(Step::new(
                &database.name,
                format!("CREATE EXTENSION IF NOT EXISTS {}", quote_ident(extension)),
            ));
        }
    }
    steps
}

fn comment(kind: &str, name: &str) -> Step {
    Step::new(
        MAINTENANCE_DB,
        format!(
            "COMMENT ON {kind} {} IS {}",
            quote_ident(name),
            quote_literal(MANAGED_COMMENT)
        ),
    )
}

/// A role that owns anything cannot be dropped. Databases kept that a dropped role owns go
/// to the superuser; inside every database kept, what the roles own goes to that database's
/// owner and their grants are revoked (REASSIGN/DROP OWNED act on one database at a time).
fn drop_roles(
    existing: &Existing,
    spec: &ComputeSpec,
    roles: &BTreeSet<&str>,
    dropped_databases: &BTreeSet<&str>,
    steps: &mut Vec<Step>,
) {
    let list = roles
        .iter()
        .map(|r| quote_ident(r))
        .collect::<Vec<_>>()
        .join(", ");
    let kept: Vec<&ExistingDatabase> = existing
        .databases
        .iter()
        .filter(|d| !dropped_databases.contains(d.name.as_str()))
        .collect();
    for database in &kept {
        if roles.contains(owner_after(spec, database)) {
            steps.push(Step::new(
                MAINTENANCE_DB,
                format!(
                    "ALTER DATABASE {} OWNER TO {}",
                    quote_ident(&database.name),
                    quote_ident(SUPERUSER)
                ),
            ));
        }
    }
    for database in kept.iter().filter(|d| d.allows_connections) {
        let owner = owner_after(spec, database);
        let heir = if roles.contains(owner) {
            SUPERUSER
        } else {
            owner
        };
        steps.push(Step::new(
            &database.name,
            format!("REASSIGN OWNED BY {list} TO {}", quote_ident(heir)),
        ));
        steps.push(Step::new(&database.name, format!("DROP OWNED BY {list}")));
    }
    for role in roles {
        steps.push(Step::new(
            MAINTENANCE_DB,
            format!("DROP ROLE {}", quote_ident(role)),
        ));
    }
}

/// Who owns `database` once the spec's databases have been created or altered.
fn owner_after<'a>(spec: &'a ComputeSpec, database: &'a ExistingDatabase) -> &'a str {
    spec.databases
        .iter()
        .find(|d| d.name == database.name)
        .map_or(database.owner.as_str(), |d| d.owner.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmhost_compute_api::{Database, Role};

    fn spec(roles: &[&str], databases: &[(&str, &str)], extensions: &[&str]) -> ComputeSpec {
        ComputeSpec {
            format_version: 1,
            roles: roles
                .iter()
                .map(|name| Role {
                    name: name.to_string(),
                    password_hash: Some(format!("md5{name}")),
                })
                .collect(),
            databases: databases
                .iter()
                .map(|(name, owner)| Database {
                    name: name.to_string(),
                    owner: owner.to_string(),
                })
                .collect(),
            settings: Default::default(),
            extensions: extensions.iter().map(|e| e.to_string()).collect(),
        }
    }

    fn role(name: &str, managed: bool) -> ExistingRole {
        ExistingRole {
            name: name.into(),
            managed,
        }
    }

    fn database(name: &str, owner: &str, managed: bool) -> ExistingDatabase {
        ExistingDatabase {
            name: name.into(),
            owner: owner.into(),
            managed,
            allows_connections: name != "template0",
        }
    }

    /// A fresh cluster, as initdb leaves it.
    fn fresh() -> Existing {
        Existing {
            roles: vec![role("postgres", false)],
            databases: vec![
                database("postgres", "postgres", false),
                database("template0", "postgres", false),
                database("template1", "postgres", false),
            ],
        }
    }

    fn sql(steps: &[Step]) -> Vec<String> {
        steps
            .iter()
            .map(|s| format!("[{}] {}", s.database, s.sql))
            .collect()
    }

    #[test]
    fn a_fresh_cluster_gets_roles_then_databases_then_extensions() {
        let steps = plan(
            &fresh(),
            &spec(&["alice"], &[("app", "alice")], &["hstore"]),
        );
        assert_eq!(
            sql(&steps),
            [
                "[postgres] CREATE ROLE \"alice\" WITH LOGIN PASSWORD 'md5alice'",
                "[postgres] COMMENT ON ROLE \"alice\" IS 'managed by computectl'",
                "[postgres] CREATE DATABASE \"app\" OWNER \"alice\"",
                "[postgres] COMMENT ON DATABASE \"app\" IS 'managed by computectl'",
                "[app] CREATE EXTENSION IF NOT EXISTS \"hstore\"",
            ]
        );
        assert_eq!(
            steps[0].summary,
            "CREATE ROLE \"alice\" WITH LOGIN PASSWORD '…'"
        );
    }

    #[test]
    fn an_applied_spec_only_resets_passwords() {
        let mut existing = fresh();
        existing.roles.push(role("alice", true));
        existing.databases.push(database("app", "alice", true));
        let steps = plan(&existing, &spec(&["alice"], &[("app", "alice")], &[]));
        assert_eq!(
            sql(&steps),
            ["[postgres] ALTER ROLE \"alice\" WITH LOGIN PASSWORD 'md5alice'"]
        );
    }

    #[test]
    fn an_owner_change_is_an_alter() {
        let mut existing = fresh();
        existing
            .roles
            .extend([role("alice", true), role("bob", true)]);
        existing.databases.push(database("app", "alice", true));
        let steps = plan(&existing, &spec(&["alice", "bob"], &[("app", "bob")], &[]));
        assert!(sql(&steps).contains(&"[postgres] ALTER DATABASE \"app\" OWNER TO \"bob\"".into()));
    }

    #[test]
    fn only_managed_roles_and_databases_are_dropped() {
        let mut existing = fresh();
        existing
            .roles
            .extend([role("old", true), role("by_hand", false)]);
        existing.databases.extend([
            database("gone", "old", true),
            database("kept_by_hand", "old", false),
            database("mine", "by_hand", false),
        ]);
        let steps = plan(&existing, &spec(&[], &[], &[]));
        assert_eq!(
            sql(&steps),
            [
                "[postgres] DROP DATABASE \"gone\" WITH (FORCE)",
                "[postgres] ALTER DATABASE \"kept_by_hand\" OWNER TO \"postgres\"",
                "[postgres] REASSIGN OWNED BY \"old\" TO \"postgres\"",
                "[postgres] DROP OWNED BY \"old\"",
                "[template1] REASSIGN OWNED BY \"old\" TO \"postgres\"",
                "[template1] DROP OWNED BY \"old\"",
                "[kept_by_hand] REASSIGN OWNED BY \"old\" TO \"postgres\"",
                "[kept_by_hand] DROP OWNED BY \"old\"",
                "[mine] REASSIGN OWNED BY \"old\" TO \"by_hand\"",
                "[mine] DROP OWNED BY \"old\"",
                "[postgres] DROP ROLE \"old\"",
            ]
        );
    }

    #[test]
    fn a_dropped_role_s_objects_go_to_the_owner_of_their_database() {
        let mut existing = fresh();
        existing
            .roles
            .extend([role("alice", true), role("old", true)]);
        existing.databases.push(database("app", "alice", true));
        let steps = plan(&existing, &spec(&["alice"], &[("app", "alice")], &[]));
        let sql = sql(&steps);
        assert!(sql.contains(&"[app] REASSIGN OWNED BY \"old\" TO \"alice\"".into()));
        assert_eq!(sql.last().unwrap(), "[postgres] DROP ROLE \"old\"");
    }

    #[test]
    fn the_superuser_is_never_dropped_and_a_listed_role_made_by_hand_is_adopted() {
        let mut existing = fresh();
        existing.roles = vec![role("postgres", true), role("carol", false)];
        let steps = plan(&existing, &spec(&["carol"], &[], &[]));
        assert_eq!(
            sql(&steps),
            [
                "[postgres] ALTER ROLE \"carol\" WITH LOGIN PASSWORD 'md5carol'",
                "[postgres] COMMENT ON ROLE \"carol\" IS 'managed by computectl'",
            ]
        );
    }

    #[test]
    fn names_are_quoted() {
        let steps = plan(&fresh(), &spec(&["Mixed\"Case"], &[], &[]));
        assert_eq!(
            steps[0].sql,
            "CREATE ROLE \"Mixed\"\"Case\" WITH LOGIN PASSWORD 'md5Mixed\"Case'"
        );
    }
}
