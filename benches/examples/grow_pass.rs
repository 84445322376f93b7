//! One `miss_getput_grow` pass alone in a fresh process: a new registry,
//! then get+put of 65,536 never-seen 64 KiB regions at a 128 KiB stride
//! (the parity workload), timed, with the minor page faults it took. The
//! per-step figures of the grow pass in `docs/BENCHMARKS.md` ("Session 5")
//! are medians of alternated runs of this example built from each commit.
//!
//! `cargo run --release -p notifier-bench --example grow_pass`

use std::time::Instant;

use notifier_rdma::parity::minor_faults;
use notifier_rdma::testing::ModelPrimary;
use notifier_rdma::{Access, RegError, Registry, RegistryConfig, SoftNic};

const REGIONS: u32 = 65_536;
const BASE: u64 = 0x1000_0000_0000;

#[inline(never)]
fn grow_pass(reg: &mut Registry<SoftNic>) -> Result<(), RegError> {
    let acc = Access::LOCAL_READ | Access::LOCAL_WRITE | Access::REMOTE_READ | Access::REMOTE_WRITE;
    for i in 0..REGIONS {
        let h = reg.get(BASE + u64::from(i) * (128 << 10), 64 << 10, acc)?;
        reg.put(h)?;
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mm = ModelPrimary::new(16);
    mm.mmap(BASE, 8 << 30, true)?;
    let nic = SoftNic::new(mm.clone());
    let mut reg = Registry::new(&*mm, nic.clone(), RegistryConfig::default());
    let f0 = minor_faults();
    let t = Instant::now();
    grow_pass(&mut reg)?;
    let ns = t.elapsed().as_nanos() as f64 / f64::from(REGIONS);
    let faults = match (f0, minor_faults()) {
        (Some(a), Some(z)) => (z - a).to_string(),
        _ => "?".into(),
    };
    let s = reg.stats();
    if s.misses != u64::from(REGIONS) || nic.stats().registrations != u64::from(REGIONS) {
        return Err(format!("expected {REGIONS} misses and registrations: {s:?}").into());
    }
    println!("miss_getput_grow {ns:.1} ns/op, {faults} minor page faults");
    Ok(())
}
