use notifier_rdma::{testing::ModelPrimary, Access, Registry, RegistryConfig, SoftNic};
use std::time::Instant;
fn main() {
    let acc = Access::LOCAL_RW | Access::REMOTE_READ | Access::REMOTE_WRITE;
    let mode = std::env::args().nth(1).unwrap_or_default();
    let iters: usize = std::env::args().nth(2).map_or(20, |s| s.parse().unwrap());
    for _ in 0..iters {
        let mm = ModelPrimary::new(16);
        mm.mmap(0x1000_0000_0000, 8 << 30, true).unwrap();
        let nic = SoftNic::new(mm.clone());
        let mut reg = Registry::new(&*mm, nic.clone(), RegistryConfig::default());
        let t = Instant::now();
        for i in 0..65536u64 {
            let a = 0x1000_0000_0000 + i * (128 << 10);
            let h = reg.get(a, 64 << 10, acc).unwrap();
            if mode == "cycle" { reg.invalidate(a, 64 << 10).unwrap(); }
            reg.put(h).unwrap();
        }
        println!("{:.1} ns/op", t.elapsed().as_nanos() as f64 / 65536.0);
    }
}
