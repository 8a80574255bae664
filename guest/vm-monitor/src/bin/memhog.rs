//! A workload for tests: grows its memory in steps, touching every page, holds it until the
//! host connects to its vsock port, then frees it and idles. Progress goes to stdout.
//!
//! usage: vmhost-memhog TARGET_MIB STEP_MIB INTERVAL_MS FREE_PORT

use nix::sys::socket::{
    accept, bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, VsockAddr,
};
use std::os::fd::AsRawFd;
use std::time::Duration;

fn main() {
    let numbers: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let [target, step, interval_ms, free_port] = numbers[..] else {
        eprintln!("usage: vmhost-memhog TARGET_MIB STEP_MIB INTERVAL_MS FREE_PORT");
        std::process::exit(2);
    };
    // Listening before the first allocation: a host that asks early is not refused.
    let listener = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .expect("vsock socket");
    bind(
        listener.as_raw_fd(),
        &VsockAddr::new(nix::libc::VMADDR_CID_ANY, free_port as u32),
    )
    .expect("bind the vsock port");
    listen(&listener, Backlog::new(1).unwrap()).expect("listen");
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    let mut held = 0;
    while held < target {
        let mib = step.min(target - held);
        // Non-zero fill: every page is really touched and owned.
        chunks.push(vec![1u8; (mib as usize) << 20]);
        held += mib;
        println!("memhog: holding {held} MiB");
        std::thread::sleep(Duration::from_millis(interval_ms));
    }
    // A test decides when the memory goes, so it can check a downscale while it is held.
    let told = accept(listener.as_raw_fd()).expect("accept");
    drop(chunks);
    println!("memhog: freed");
    let _ = nix::unistd::close(told);
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
