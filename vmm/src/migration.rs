//! Live migration and the vsock device's unplug/replug around it, on one QEMU.
//!
//! Both ends speak QEMU's migration stream over a local unix socket; whoever runs this
//! carries the socket's bytes to the other host.

use crate::cmdline::{oob_socket, VSOCK_CHARDEV_ID, VSOCK_DEVICE_ID, VSOCK_ROOT_PORT};
use crate::machine::{Machine, VmmError};
use crate::qmp::{
    ChardevAddUnix, ChardevDeviceAdd, ChardevRemove, DeviceDel, Migrate, MigrateCancel,
    MigrateContinue, MigrateIncoming, MigrateSetCapabilities, MigrateSetParameters,
    MigrateStartPostcopy, MigrationCapability, MigrationInfo, OobMonitor, QmpError, QomList,
    QueryMigrate,
};
use crate::status::MigrationStatus;
use qapi::qmp::Event;
use std::path::Path;
use std::time::Duration;
use tokio::sync::broadcast::{self, error::RecvError};

/// A unix socket as a migration URI.
pub fn unix_uri(path: &Path) -> String {
    format!("unix:{}", path.display())
}

/// A migration's status changes: QEMU's MIGRATION events, or statuses sent by a test double.
pub struct MigrationEvents(Source);

enum Source {
    Qmp(broadcast::Receiver<Event>),
    Statuses(broadcast::Receiver<MigrationStatus>),
}

impl MigrationEvents {
    /// Changes sent by hand, for a [`Vm`](crate::Vm) that is not a QEMU.
    pub fn from_statuses(statuses: broadcast::Receiver<MigrationStatus>) -> Self {
        MigrationEvents(Source::Statuses(statuses))
    }

    /// Returns at the next status change, with the new status, or after `within` with
    /// `None`.
    pub async fn next_change(&mut self, within: Duration) -> Option<MigrationStatus> {
        tokio::time::timeout(within, async {
            loop {
                let next = match &mut self.0 {
                    Source::Qmp(events) => match events.recv().await {
                        Ok(Event::MIGRATION { data, .. }) => {
                            Ok(MigrationStatus::from(qapi::Enum::name(&data.status)))
                        }
                        Ok(_) => continue,
                        Err(error) => Err(error),
                    },
                    Source::Statuses(statuses) => statuses.recv().await,
                };
                match next {
                    Ok(status) => return status,
                    Err(RecvError::Lagged(_)) => continue,
                    // QEMU is gone; the caller finds out from its next command.
                    Err(RecvError::Closed) => std::future::pending::<()>().await,
                }
            }
        })
        .await
        .ok()
    }
}

impl Machine {
    /// Status changes of this QEMU's migration from now on.
    pub fn migration_events(&self) -> MigrationEvents {
        MigrationEvents(Source::Qmp(self.qmp().subscribe()))
    }

    /// Sets the capabilities both ends must agree on, and this end's parameters.
    pub async fn prepare_migration(
        &self,
        postcopy: bool,
        parameters: MigrateSetParameters,
    ) -> Result<(), VmmError> {
        self.qmp()
            .execute(MigrateSetCapabilities {
                capabilities: vec![
                    MigrationCapability {
                        capability: "postcopy-ram".into(),
                        state: postcopy,
                    },
                    // A MIGRATION event on each status change; see [`MigrationEvents`].
                    MigrationCapability {
                        capability: "events".into(),
                        state: true,
                    },
                ],
            })
            .await?;
        self.qmp().execute(parameters).await?;
        Ok(())
    }

    /// On the source: stop at the switchover, after the guest is paused and before its
    /// disks are handed over, until [`Machine::continue_switchover`]; a disk mirror is
    /// finished there.
    pub async fn pause_before_switchover(&self) -> Result<(), VmmError> {
        self.qmp()
            .execute(MigrateSetCapabilities {
                capabilities: vec![MigrationCapability {
                    capability: "pause-before-switchover".into(),
                    state: true,
                }],
            })
            .await?;
        Ok(())
    }

    pub async fn continue_switchover(&self) -> Result<(), VmmError> {
        self.qmp()
            .execute(MigrateContinue {
                state: "pre-switchover".into(),
            })
            .await?;
        Ok(())
    }

    /// On the destination (started with `-incoming defer`): listen at `socket`.
    pub async fn listen_incoming(&self, socket: &Path) -> Result<(), VmmError> {
        let _ = std::fs::remove_file(socket);
        self.qmp()
            .execute(MigrateIncoming {
                uri: unix_uri(socket),
            })
            .await?;
        Ok(())
    }

    /// On the destination, before the stream starts: opens the out-of-band session a
    /// recovery needs (see [`Machine::recover_incoming`]).
    pub async fn open_oob_monitor(&self, timeout: Duration) -> Result<(), VmmError> {
        let monitor = OobMonitor::connect(&oob_socket(self.qmp_socket()), timeout).await?;
        *self.oob().lock().await = Some(monitor);
        Ok(())
    }

    pub async fn close_oob_monitor(&self) {
        *self.oob().lock().await = None;
    }

    /// On the destination of a paused post-copy migration: listen again at `socket`.
    /// Out of band, since the main loop may be stuck on a page still on the source.
    pub async fn recover_incoming(&self, socket: &Path, timeout: Duration) -> Result<(), VmmError> {
        let _ = std::fs::remove_file(socket);
        let mut oob = self.oob().lock().await;
        let monitor = oob.as_mut().ok_or(VmmError::NoOobMonitor)?;
        monitor
            .execute(
                "migrate-recover",
                serde_json::json!({ "uri": unix_uri(socket) }),
                timeout,
            )
            .await?;
        Ok(())
    }

    /// On the source: send the VM to `socket`, or with `resume` continue a paused
    /// post-copy migration there.
    pub async fn migrate_to(&self, socket: &Path, resume: bool) -> Result<(), VmmError> {
        self.qmp()
            .execute(Migrate {
                uri: unix_uri(socket),
                resume,
            })
            .await?;
        Ok(())
    }

    pub async fn start_postcopy(&self) -> Result<(), VmmError> {
        self.qmp().execute(MigrateStartPostcopy {}).await?;
        Ok(())
    }

    pub async fn cancel_migration(&self) -> Result<(), VmmError> {
        self.qmp().execute(MigrateCancel {}).await?;
        Ok(())
    }

    pub async fn migration_info(&self) -> Result<MigrationInfo, VmmError> {
        Ok(self.qmp().execute(QueryMigrate {}).await?)
    }

    /// Unplugs the vsock device (the guest must eject it) and drops its chardev. A VM
    /// without one is left as it is.
    pub async fn unplug_vsock(&self, timeout: Duration) -> Result<(), VmmError> {
        let mut events = self.qmp().subscribe();
        match self
            .qmp()
            .execute(DeviceDel {
                id: VSOCK_DEVICE_ID.into(),
            })
            .await
        {
            Err(QmpError::Command { message, .. }) if message.contains("not found") => {}
            Err(error) => return Err(error.into()),
            Ok(_) => {
                self.wait_event(&mut events, "eject the vsock device", timeout, |event| {
                    matches!(event, Event::DEVICE_DELETED { data, .. }
                        if data.device.as_deref() == Some(VSOCK_DEVICE_ID))
                    .then_some(())
                })
                .await?;
            }
        }
        match self
            .qmp()
            .execute(ChardevRemove {
                id: VSOCK_CHARDEV_ID.into(),
            })
            .await
        {
            Err(QmpError::Command { message, .. }) if message.contains("not found") => Ok(()),
            other => other.map(|_| ()).map_err(Into::into),
        }
    }

    /// Whether the VM has its vsock device: a migration target that finished its arrival
    /// has it, one still arriving does not.
    pub async fn vsock_plugged(&self) -> Result<bool, VmmError> {
        let devices = self
            .qmp()
            .execute(QomList {
                path: "/machine/peripheral".into(),
            })
            .await?;
        Ok(devices.iter().any(|device| device.name == VSOCK_DEVICE_ID))
    }

    /// Plugs a vhost-user-vsock device served by the backend at `vhost_socket` into the
    /// VM's empty vsock root port.
    pub async fn plug_vsock(&self, vhost_socket: &Path) -> Result<(), VmmError> {
        self.qmp()
            .execute(ChardevAddUnix::new(VSOCK_CHARDEV_ID, vhost_socket))
            .await?;
        let added = self
            .qmp()
            .execute(ChardevDeviceAdd {
                driver: "vhost-user-vsock-pci".into(),
                id: VSOCK_DEVICE_ID.into(),
                chardev: VSOCK_CHARDEV_ID.into(),
                bus: VSOCK_ROOT_PORT.into(),
            })
            .await;
        if let Err(error) = added {
            let _ = self
                .qmp()
                .execute(ChardevRemove {
                    id: VSOCK_CHARDEV_ID.into(),
                })
                .await;
            return Err(error.into());
        }
        Ok(())
    }
}
