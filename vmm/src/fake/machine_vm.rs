//! What a fake QEMU answers: the [`Vm`] trait, with QEMU's refusals.

use super::machine::*;
use super::*;

#[async_trait]
impl Vm for FakeMachine {
    fn pid(&self) -> i32 {
        self.pid
    }

    fn exited_now(&self) -> bool {
        *self.exited.borrow()
    }

    async fn exited(&self) {
        let _ = self.exited.subscribe().wait_for(|gone| *gone).await;
    }

    async fn status(&self) -> Result<StatusInfo, VmmError> {
        self.enter(Step::Status, String::new()).await?;
        Ok(self.state().run.clone())
    }

    async fn pause_guest(&self) -> Result<(), VmmError> {
        self.enter(Step::PauseGuest, String::new()).await?;
        let mut st = self.state();
        if st.run.running {
            st.run = run("paused", false);
        }
        Ok(())
    }

    async fn vcpus(&self) -> Result<u32, VmmError> {
        self.enter(Step::Vcpus, String::new()).await?;
        Ok(self.state().vcpus)
    }

    async fn set_vcpus(&self, target: u32, _timeout: Duration) -> Result<u32, VmmError> {
        self.enter(Step::SetVcpus, target.to_string()).await?;
        let mut st = self.state();
        let (slots, fixed) = (self.spec.vcpu_slots, self.spec.boot_vcpus);
        if target > slots || target < fixed.max(1) {
            return Err(VmmError::VcpusOutOfRange {
                target,
                slots,
                fixed,
            });
        }
        let plugs = target.saturating_sub(st.vcpus);
        if let Some(left) = st.plugs_left {
            // TCG: QEMU aborts on the plug past its translation contexts.
            if plugs > left {
                st.vcpus += left;
                st.plugs_left = Some(0);
                let action = format!("acknowledge vCPU {}", st.vcpus + 1);
                self.exit(&mut st);
                return Err(VmmError::Exited { action });
            }
            st.plugs_left = Some(left - plugs);
        }
        st.vcpus = target;
        Ok(plugs)
    }

    async fn hotplug_memory(&self) -> Result<u64, VmmError> {
        self.enter(Step::HotplugMemory, String::new()).await?;
        Ok(self.state().hotplug_memory)
    }

    async fn set_hotplug_memory(&self, bytes: u64, _timeout: Duration) -> Result<(), VmmError> {
        self.enter(Step::SetHotplugMemory, bytes.to_string())
            .await?;
        let region = self.spec.hotplug_memory_bytes;
        if region == 0 {
            return Err(VmmError::NoHotplugMemory);
        }
        if bytes > region {
            return Err(qmp_refused(
                "qom-set",
                format!("'requested-size' cannot exceed the memory backend size of {region}"),
            ));
        }
        if !bytes.is_multiple_of(VIRTIO_MEM_BLOCK_BYTES) {
            return Err(qmp_refused(
                "qom-set",
                format!("'requested-size' must be multiple of {VIRTIO_MEM_BLOCK_BYTES}"),
            ));
        }
        self.state().hotplug_memory = bytes;
        Ok(())
    }

    async fn shutdown(&self, grace: Duration) -> Result<(), VmmError> {
        if self
            .enter_quit(Step::Shutdown, format!("{grace:?}"))
            .await?
        {
            self.exit(&mut self.state());
        }
        Ok(())
    }

    async fn terminate(&self) -> Result<(), VmmError> {
        if self.enter_quit(Step::Terminate, String::new()).await? {
            self.exit(&mut self.state());
        }
        Ok(())
    }

    fn migration_events(&self) -> MigrationEvents {
        let receiver = match &self.state().events {
            Some(events) => events.subscribe(),
            // Gone: a closed subscription, as from a QEMU that exited.
            None => broadcast::channel(1).1,
        };
        MigrationEvents::from_statuses(receiver)
    }

    async fn prepare_migration(
        &self,
        postcopy: bool,
        parameters: MigrateSetParameters,
    ) -> Result<(), VmmError> {
        let args = format!("postcopy={postcopy}, {parameters:?}");
        self.enter(Step::PrepareMigration, args).await?;
        let mut st = self.state();
        if Self::migration_in_progress(&st) {
            return Err(qmp_refused(
                "migrate-set-capabilities",
                "There's a migration process in progress",
            ));
        }
        st.postcopy = Some(postcopy);
        st.events_enabled = true;
        st.parameters = Some(parameters);
        Ok(())
    }

    async fn pause_before_switchover(&self) -> Result<(), VmmError> {
        self.enter(Step::PauseBeforeSwitchover, String::new())
            .await?;
        let mut st = self.state();
        if Self::migration_in_progress(&st) {
            return Err(qmp_refused(
                "migrate-set-capabilities",
                "There's a migration process in progress",
            ));
        }
        st.pause_before_switchover = true;
        Ok(())
    }

    async fn continue_switchover(&self) -> Result<(), VmmError> {
        self.enter(Step::ContinueSwitchover, String::new()).await?;
        let mut st = self.state();
        if st.migration != MigrationStatus::PreSwitchover {
            let message = format!("Migration not in expected state: {}", st.migration.as_str());
            return Err(qmp_refused("migrate-continue", message));
        }
        let next = st
            .after_switchover
            .take()
            .unwrap_or(MigrationStatus::Completed);
        self.transition(&mut st, MigrationStatus::Device);
        self.transition(&mut st, next);
        Ok(())
    }

    async fn listen_incoming(&self, socket: &Path) -> Result<(), VmmError> {
        self.enter(Step::ListenIncoming, socket.display().to_string())
            .await?;
        let mut st = self.state();
        if !st.incoming {
            return Err(qmp_refused(
                "migrate-incoming",
                "'-incoming' was not specified on the command line",
            ));
        }
        if st.migration != MigrationStatus::None {
            return Err(qmp_refused(
                "migrate-incoming",
                "The incoming migration has already been started",
            ));
        }
        st.incoming_socket = Some(socket.to_path_buf());
        self.transition(&mut st, MigrationStatus::Setup);
        Ok(())
    }

    async fn open_oob_monitor(&self, timeout: Duration) -> Result<(), VmmError> {
        self.enter(Step::OpenOobMonitor, format!("{timeout:?}"))
            .await?;
        self.state().oob_open = true;
        Ok(())
    }

    async fn close_oob_monitor(&self) {
        self.state().oob_open = false;
    }

    async fn recover_incoming(&self, socket: &Path, timeout: Duration) -> Result<(), VmmError> {
        let args = format!("{}, {timeout:?}", socket.display());
        self.enter(Step::RecoverIncoming, args).await?;
        let mut st = self.state();
        if !st.oob_open {
            return Err(VmmError::NoOobMonitor);
        }
        if st.migration != MigrationStatus::PostcopyPaused {
            return Err(qmp_refused(
                "migrate-recover",
                "Migrate recover can only be run when postcopy is paused.",
            ));
        }
        st.recoveries.push(socket.to_path_buf());
        self.transition(&mut st, MigrationStatus::PostcopyRecover);
        Ok(())
    }

    async fn migrate_to(&self, socket: &Path, resume: bool) -> Result<(), VmmError> {
        let args = format!("{}, resume={resume}", socket.display());
        self.enter(Step::MigrateTo, args).await?;
        let mut st = self.state();
        if resume {
            if st.migration != MigrationStatus::PostcopyPaused {
                return Err(qmp_refused(
                    "migrate",
                    "Cannot resume if there is no paused migration",
                ));
            }
            st.outgoing_socket = Some(socket.to_path_buf());
            self.transition(&mut st, MigrationStatus::PostcopyRecover);
            self.transition(&mut st, MigrationStatus::PostcopyActive);
            return Ok(());
        }
        if st.incoming {
            return Err(qmp_refused(
                "migrate",
                "Guest is waiting for an incoming migration",
            ));
        }
        if Self::migration_in_progress(&st) {
            return Err(qmp_refused(
                "migrate",
                "There's a migration process in progress",
            ));
        }
        let total = self.spec.boot_memory_bytes + st.hotplug_memory;
        st.ram = RamStats {
            total,
            remaining: total,
            ..RamStats::default()
        };
        st.error_desc = None;
        st.after_switchover = None;
        st.outgoing_socket = Some(socket.to_path_buf());
        self.transition(&mut st, MigrationStatus::Setup);
        self.transition(&mut st, MigrationStatus::Active);
        Ok(())
    }

    async fn start_postcopy(&self) -> Result<(), VmmError> {
        self.enter(Step::StartPostcopy, String::new()).await?;
        let mut st = self.state();
        if st.postcopy != Some(true) {
            return Err(qmp_refused(
                "migrate-start-postcopy",
                "Enable postcopy with migrate_set_capability before the start of migration",
            ));
        }
        match st.migration {
            MigrationStatus::None => Err(qmp_refused(
                "migrate-start-postcopy",
                "Postcopy must be started after migration has been started",
            )),
            MigrationStatus::Setup | MigrationStatus::Active if st.postcopy_switch_held => Ok(()),
            MigrationStatus::Setup | MigrationStatus::Active if st.pause_before_switchover => {
                st.after_switchover = Some(MigrationStatus::PostcopyActive);
                self.transition(&mut st, MigrationStatus::PreSwitchover);
                Ok(())
            }
            MigrationStatus::Setup | MigrationStatus::Active => {
                self.transition(&mut st, MigrationStatus::PostcopyActive);
                Ok(())
            }
            // QEMU only sets a flag, which a finished migration ignores.
            _ => Ok(()),
        }
    }

    async fn cancel_migration(&self) -> Result<(), VmmError> {
        self.enter(Step::CancelMigration, String::new()).await?;
        let mut st = self.state();
        if st.migration.is_postcopy() {
            // Newer QEMUs refuse; older ones fail the migration and lose the guest.
            return Err(qmp_refused(
                "migrate_cancel",
                "Postcopy migration can't be cancelled",
            ));
        }
        if !st.incoming && st.migration.is_unfinished_precopy() {
            st.after_switchover = None;
            self.transition(&mut st, MigrationStatus::Cancelling);
            self.transition(&mut st, MigrationStatus::Cancelled);
        }
        Ok(())
    }

    async fn migration_info(&self) -> Result<MigrationInfo, VmmError> {
        self.enter(Step::MigrationInfo, String::new()).await?;
        let st = self.state();
        let started = st.migration != MigrationStatus::None;
        let completed = st.migration == MigrationStatus::Completed;
        Ok(MigrationInfo {
            status: st.migration.clone(),
            ram: (started && !st.incoming).then(|| st.ram.clone()),
            downtime: completed.then_some(1),
            total_time: started.then_some(1),
            error_desc: (st.migration == MigrationStatus::Failed)
                .then(|| st.error_desc.clone())
                .flatten(),
        })
    }

    async fn export_disk(&self, socket: &Path) -> Result<(), VmmError> {
        self.enter(Step::ExportDisk, socket.display().to_string())
            .await?;
        let mut st = self.state();
        if st.export.is_some() {
            return Err(qmp_refused(
                "nbd-server-start",
                "NBD server already running",
            ));
        }
        if self.spec.disk.is_none() {
            return Err(qmp_refused(
                "block-export-add",
                "Cannot find device=disk0 nor node-name=disk0",
            ));
        }
        st.export = Some(socket.to_path_buf());
        Ok(())
    }

    async fn unexport_disk(&self) -> Result<(), VmmError> {
        self.enter(Step::UnexportDisk, String::new()).await?;
        match self.state().export.take() {
            Some(_) => Ok(()),
            None => Err(qmp_refused("nbd-server-stop", "NBD server not running")),
        }
    }

    async fn start_disk_mirror(&self, socket: &Path) -> Result<(), VmmError> {
        self.enter(Step::StartDiskMirror, socket.display().to_string())
            .await?;
        let mut st = self.state();
        if self.spec.disk.is_none() {
            return Err(qmp_refused(
                "blockdev-mirror",
                "Cannot find device=disk0 nor node-name=disk0",
            ));
        }
        if st.mirror.is_some() {
            let message = format!("Job ID '{MIRROR_JOB}' already in use");
            return Err(qmp_refused("blockdev-mirror", message));
        }
        let progress = st.next_mirror.take().unwrap_or(MirrorProgress {
            copied_bytes: FAKE_DISK_BYTES,
            total_bytes: FAKE_DISK_BYTES,
            ready: true,
        });
        st.mirror = Some(Mirror {
            progress,
            error: None,
        });
        Ok(())
    }

    async fn disk_mirror_progress(&self) -> Result<MirrorProgress, VmmError> {
        self.enter(Step::DiskMirrorProgress, String::new()).await?;
        match &self.state().mirror {
            None => Err(VmmError::UnexpectedReply {
                property: "block jobs".into(),
                value: format!("the disk mirror '{MIRROR_JOB}' is gone"),
            }),
            Some(Mirror {
                error: Some(error), ..
            }) => Err(VmmError::UnexpectedReply {
                property: "disk mirror".into(),
                value: format!("concluded ({error})"),
            }),
            Some(mirror) => Ok(mirror.progress),
        }
    }

    async fn finish_disk_mirror(&self, timeout: Duration) -> Result<(), VmmError> {
        self.enter(Step::FinishDiskMirror, format!("{timeout:?}"))
            .await?;
        let Some(mirror) = self.state().mirror.take() else {
            let message = format!("Block job '{MIRROR_JOB}' not found");
            return Err(qmp_refused("block-job-cancel", message));
        };
        let failure = match (mirror.error, mirror.progress.ready) {
            (Some(error), _) => error,
            (None, false) => "cancelled before it caught up".into(),
            (None, true) => return Ok(()),
        };
        Err(VmmError::UnexpectedReply {
            property: "disk mirror".into(),
            value: failure,
        })
    }

    async fn abandon_disk_mirror(&self) {
        if self
            .enter(Step::AbandonDiskMirror, String::new())
            .await
            .is_ok()
        {
            self.state().mirror = None;
        }
    }

    async fn unplug_vsock(&self, timeout: Duration) -> Result<(), VmmError> {
        self.enter(Step::UnplugVsock, format!("{timeout:?}"))
            .await?;
        self.state().vsock_plugged = false;
        Ok(())
    }

    async fn plug_vsock(&self, vhost_socket: &Path) -> Result<(), VmmError> {
        self.enter(Step::PlugVsock, vhost_socket.display().to_string())
            .await?;
        let mut st = self.state();
        if st.vsock_plugged {
            return Err(qmp_refused(
                "chardev-add",
                "attempt to add duplicate property 'vsock0'",
            ));
        }
        if let Some(refusal) = self.backend_refuses(vhost_socket) {
            return Err(qmp_refused("chardev-add", refusal));
        }
        st.vsock_plugged = true;
        Ok(())
    }

    async fn vsock_plugged(&self) -> Result<bool, VmmError> {
        self.enter(Step::VsockPlugged, String::new()).await?;
        Ok(self.state().vsock_plugged)
    }
}
