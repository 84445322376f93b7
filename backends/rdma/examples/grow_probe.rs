//! temp probe
use notifier_rdma::{testing::ModelPrimary, Access, Registry, RegistryConfig, SoftNic};
use std::time::Instant;
fn faults() -> u64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap();
    let r = &s[s.rfind(')').unwrap() + 2..];
    r.split(' ').nth(7).unwrap().parse().unwrap()
}
fn main() {
    let n: u32 = std::env::args()
        .nth(1)
        .map_or(65536, |s| s.parse().unwrap());
    let acc = Access::LOCAL_RW | Access::REMOTE_READ | Access::REMOTE_WRITE;
    let rounds: u32 = std::env::args().nth(2).map_or(3, |s| s.parse().unwrap());
    for round in 0..rounds {
        let mm = ModelPrimary::new(16);
        mm.mmap(0x1000_0000_0000, 8 << 30, true).unwrap();
        let nic = SoftNic::new(mm.clone());
        let mut reg = Registry::new(&*mm, nic.clone(), RegistryConfig::default());
        let f = faults();
        let t = Instant::now();
        for i in 0..n {
            let h = reg
                .get(0x1000_0000_0000 + u64::from(i) * (128 << 10), 64 << 10, acc)
                .unwrap();
            reg.put(h).unwrap();
        }
        let d = t.elapsed().as_nanos() as f64 / f64::from(n);
        println!("round {round}: {d:.1} ns/op, {} faults", faults() - f);
        if round == 2 {
            std::mem::forget(reg);
        }
    }
}
