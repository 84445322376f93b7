//! temp probe
use notifier_rdma::{testing::ModelPrimary, Access, Registry, RegistryConfig, SoftNic};
use std::hint::black_box;
use std::time::Instant;
fn main() {
    let r: u32 = std::env::args().nth(1).map_or(4096, |s| s.parse().unwrap());
    let ops: u64 = std::env::args()
        .nth(2)
        .map_or(1_000_000, |s| s.parse().unwrap());
    let acc = Access::LOCAL_RW | Access::REMOTE_READ | Access::REMOTE_WRITE;
    let base = 0x1000_0000_0000u64;
    let mm = ModelPrimary::new(16);
    mm.mmap(base, u64::from(r) * (128 << 10), true).unwrap();
    let nic = SoftNic::new(mm.clone());
    let mut reg = Registry::new(&*mm, nic.clone(), RegistryConfig::default());
    let addr = |i: u32| base + u64::from(i) * (128 << 10);
    for i in 0..r {
        let h = reg.get(addr(i), 64 << 10, acc).unwrap();
        reg.put(h).unwrap();
    }
    for l in 0..5u64 {
        let t = Instant::now();
        for i in l * ops..(l + 1) * ops {
            let idx = (i as u32).wrapping_mul(2_654_435_761) & (r - 1);
            let h = reg.get(addr(idx), 64 << 10, acc).unwrap();
            reg.put(black_box(h)).unwrap();
        }
        println!("{:.2} ns/op", t.elapsed().as_nanos() as f64 / ops as f64);
    }
}
