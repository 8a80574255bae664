//! SQL as the superuser over the unix socket (peer authentication, mapped from root).

use crate::config::{PG_PORT, SOCKET_DIR};
use crate::reconcile::{
    self, Existing, ExistingDatabase, ExistingRole, Step, MAINTENANCE_DB, MANAGED_COMMENT,
    SUPERUSER,
};
use crate::retune::{self, Tuning};
use crate::sql::quote_literal;
use anyhow::Context;
use std::collections::HashMap;
use std::time::Duration;
use tokio_postgres::{Client, NoTls};
use vmhost_compute_api::ComputeSpec;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// computectl's connections, so a reader of pg_stat_activity can tell them apart.
const APPLICATION_NAME: &str = "computectl";

pub async fn connect(database: &str) -> anyhow::Result<Client> {
    let (client, connection) = tokio_postgres::Config::new()
        .host_path(SOCKET_DIR)
        .port(PG_PORT)
        .user(SUPERUSER)
        .dbname(database)
        .application_name(APPLICATION_NAME)
        .connect_timeout(CONNECT_TIMEOUT)
        .connect(NoTls)
        .await
        .with_context(|| {
            format!("cannot connect to database {database} as {SUPERUSER} in {SOCKET_DIR}")
        })?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!("a connection to postgres ended: {e}");
        }
    });
    Ok(client)
}

/// Whether a server answers queries: false while it starts up or recovers.
pub async fn accepts_connections() -> bool {
    match connect(MAINTENANCE_DB).await {
        Ok(client) => client.simple_query("SELECT 1").await.is_ok(),
        Err(_) => false,
    }
}

/// Nothing listens on the socket: no server, or one that died and left its socket.
fn is_not_running(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause.downcast_ref::<std::io::Error>().is_some_and(|e| {
            matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            )
        })
    })
}

/// Logs what the configuration files hold that the server cannot use (a bad value, or a
/// change that waits for a restart), then has the server reread them.
pub async fn reload() -> anyhow::Result<()> {
    let client = connect(MAINTENANCE_DB).await?;
    let problems = client
        .query(
            "SELECT name, coalesce(sourcefile, ''), coalesce(sourceline, 0), error \
             FROM pg_file_settings WHERE error IS NOT NULL",
            &[],
        )
        .await
        .context("cannot check the configuration files")?;
    for row in problems {
        let (name, file, line, error): (String, String, i32, String) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        tracing::warn!(%file, line, "setting {name}: {error} (a bad value, or one that needs a restart)");
    }
    client
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .context("cannot reload the configuration")
}

pub async fn reconcile(spec: &ComputeSpec) -> anyhow::Result<()> {
    let client = connect(MAINTENANCE_DB).await?;
    let existing = existing(&client).await?;
    let steps = reconcile::plan(&existing, spec);
    execute(client, &steps).await
}

async fn existing(client: &Client) -> anyhow::Result<Existing> {
    let managed = |catalog: &str| {
        format!(
            "coalesce(shobj_description(oid, '{catalog}'), '') = {}",
            quote_literal(MANAGED_COMMENT)
        )
    };
    let roles = client
        .query(
            &format!("SELECT rolname, {} FROM pg_roles", managed("pg_authid")),
            &[],
        )
        .await
        .context("cannot list roles")?
        .into_iter()
        .map(|row| ExistingRole {
            name: row.get(0),
            managed: row.get(1),
        })
        .collect();
    let databases = client
        .query(
            &format!(
                "SELECT datname, pg_get_userbyid(datdba), datallowconn, {} FROM pg_database",
                managed("pg_database")
            ),
            &[],
        )
        .await
        .context("cannot list databases")?
        .into_iter()
        .map(|row| ExistingDatabase {
            name: row.get(0),
            owner: row.get(1),
            allows_connections: row.get(2),
            managed: row.get(3),
        })
        .collect();
    Ok(Existing { roles, databases })
}

/// Runs each step in its database, one statement at a time (CREATE and DROP DATABASE
/// cannot run in a transaction).
async fn execute(maintenance: Client, steps: &[Step]) -> anyhow::Result<()> {
    let mut clients = HashMap::from([(MAINTENANCE_DB.to_string(), maintenance)]);
    for step in steps {
        if !clients.contains_key(&step.database) {
            clients.insert(step.database.clone(), connect(&step.database).await?);
        }
        let client = &clients[&step.database];
        client
            .batch_execute(&step.sql)
            .await
            .with_context(|| format!("{} (in database {})", step.summary, step.database))?;
        tracing::info!(database = %step.database, "{}", step.summary);
    }
    Ok(())
}

/// Whether a client backend other than this connection is in a query or a transaction.
pub async fn clients_active(client: &Client) -> anyhow::Result<bool> {
    let row = client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE backend_type = 'client backend' AND state <> 'idle' \
             AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .context("cannot read pg_stat_activity")?;
    Ok(row.get::<_, i64>(0) > 0)
}

/// Applies the formula for `memory_bytes` to the running server; `None` if no server runs.
pub async fn retune(memory_bytes: u64) -> anyhow::Result<Option<Tuning>> {
    let client = match connect(MAINTENANCE_DB).await {
        Ok(client) => client,
        Err(e) if is_not_running(&e) => return Ok(None),
        Err(e) => return Err(e),
    };
    let max_connections: i32 = client
        .query_one("SELECT current_setting('max_connections')::int4", &[])
        .await
        .context("cannot read max_connections")?
        .get(0);
    let tuning = retune::tuning(memory_bytes, u32::try_from(max_connections).unwrap_or(1));
    for statement in tuning.statements() {
        client
            .batch_execute(&statement)
            .await
            .with_context(|| statement.clone())?;
    }
    client
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .context("cannot reload the configuration")?;
    Ok(Some(tuning))
}
