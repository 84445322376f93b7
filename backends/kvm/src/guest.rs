//! A tiny 16-bit real-mode guest that reads and writes guest-physical
//! memory on command, driven by port I/O: the proof that KVM (and so the
//! guest) sees the primary's current frame.
//!
//! Portable: no paging, no vendor-specific setup (the setup of the
//! kvm-ioctls docs example). The program sits at [`CODE_GPA`]:
//!
//! ```text
//! loop: in  ax, 0x10      ; segment   (VMM answers)
//!       mov es, ax
//!       in  ax, 0x11      ; offset
//!       mov bx, ax
//!       in  al, 0x12      ; command: 0 read, 1 write, else hlt
//!       cmp al, 0 / je read / cmp al, 1 / je write / hlt / jmp loop
//! read: mov eax, es:[bx]  ; 4 bytes of guest-physical memory
//!       out 0x13, eax     ; report them
//!       jmp loop
//! write:in  eax, 0x14     ; value
//!       mov es:[bx], eax
//!       out 0x13, eax     ; acknowledge
//!       jmp loop
//! ```
//!
//! A guest access to a hole of the host view comes back as an exit that
//! [`RealModeGuest`] serves through the mirror (see [`crate::KvmMirror`]'s
//! "Demand faults"). Addresses are limited to the first MiB (real mode).

use std::sync::Arc;

use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use notifier_core::primary::Primary;
use notifier_core::PAGE_SIZE;

use crate::{KvmError, KvmMirror, RealGuestMemory};

/// Guest memory that a [`RealModeGuest`] runs over: what it needs to load
/// its program and to serve the exits guest-memory accesses can take.
/// Implemented by [`KvmMirror`] (a model primary) and [`RealGuestMemory`]
/// (guest RAM the VMM owns).
pub trait GuestMemoryExits {
    /// The VM.
    fn vm(&self) -> &Arc<VmFd>;
    /// Complete an emulated read at `gpa`; false when `gpa` is in no region
    /// (real MMIO).
    ///
    /// # Errors
    /// The memory's own errors.
    fn mmio_read(&self, gpa: u64, data: &mut [u8]) -> Result<bool, KvmError>;
    /// Complete an emulated write at `gpa`; false when `gpa` is in no region.
    ///
    /// # Errors
    /// The memory's own errors.
    fn mmio_write(&self, gpa: u64, data: &[u8]) -> Result<bool, KvmError>;
    /// Make the page of `gpa` accessible (a `KVM_EXIT_MEMORY_FAULT` or an
    /// instruction fetch that failed).
    ///
    /// # Errors
    /// The memory's own errors.
    fn handle_fault(&self, gpa: u64, write: bool) -> Result<(), KvmError>;
    /// Whether the page of `gpa` is mapped read-only now (a second memory
    /// fault on it is then a write).
    fn read_only(&self, gpa: u64) -> bool {
        let _ = gpa;
        false
    }
}

impl<P: Primary + ?Sized> GuestMemoryExits for KvmMirror<P> {
    fn vm(&self) -> &Arc<VmFd> {
        KvmMirror::vm(self)
    }
    fn mmio_read(&self, gpa: u64, data: &mut [u8]) -> Result<bool, KvmError> {
        KvmMirror::mmio_read(self, gpa, data)
    }
    fn mmio_write(&self, gpa: u64, data: &[u8]) -> Result<bool, KvmError> {
        KvmMirror::mmio_write(self, gpa, data)
    }
    fn handle_fault(&self, gpa: u64, write: bool) -> Result<(), KvmError> {
        KvmMirror::handle_fault(self, gpa, write).map(drop)
    }
    fn read_only(&self, gpa: u64) -> bool {
        self.translation(gpa).is_some_and(|t| !t.writable)
    }
}

/// Over real memory, KVM reads the VMM's mapping itself; an emulated
/// access that still exits (the mapping was unreachable for the emulator)
/// is completed through the RAM, which faults the page in.
impl GuestMemoryExits for RealGuestMemory {
    fn vm(&self) -> &Arc<VmFd> {
        RealGuestMemory::vm(self)
    }
    fn mmio_read(&self, gpa: u64, data: &mut [u8]) -> Result<bool, KvmError> {
        match self.translate(gpa) {
            Some((ram, off)) => ram.read(off, data).map(|()| true),
            None => Ok(false),
        }
    }
    fn mmio_write(&self, gpa: u64, data: &[u8]) -> Result<bool, KvmError> {
        match self.translate(gpa) {
            Some((ram, off)) => ram.write(off, data).map(|()| true),
            None => Ok(false),
        }
    }
    fn handle_fault(&self, gpa: u64, write: bool) -> Result<(), KvmError> {
        let (ram, off) = self.translate(gpa).ok_or(KvmError::Unmapped(gpa))?;
        let page = off & !(PAGE_SIZE - 1);
        if write {
            ram.populate(page, PAGE_SIZE)
        } else {
            ram.read(page, &mut [0u8]).map(drop)
        }
    }
}

/// Where the program is loaded.
pub const CODE_GPA: u64 = 0x1000;
/// Port the guest reads the segment from.
pub const PORT_SEG: u16 = 0x10;
/// Port the guest reads the offset from.
pub const PORT_OFF: u16 = 0x11;
/// Port the guest reads the command from.
pub const PORT_CMD: u16 = 0x12;
/// Port the guest reports data on.
pub const PORT_DATA: u16 = 0x13;
/// Port the guest reads a value to write from.
pub const PORT_WDATA: u16 = 0x14;

/// The program's machine code.
#[rustfmt::skip]
pub const PROGRAM: [u8; 54] = [
    0xBA, 0x10, 0x00,       // 0:  mov dx, 0x10
    0xED,                   // 3:  in ax, dx
    0x8E, 0xC0,             // 4:  mov es, ax
    0xBA, 0x11, 0x00,       // 6:  mov dx, 0x11
    0xED,                   // 9:  in ax, dx
    0x89, 0xC3,             // 10: mov bx, ax
    0xBA, 0x12, 0x00,       // 12: mov dx, 0x12
    0xEC,                   // 15: in al, dx
    0x3C, 0x00,             // 16: cmp al, 0
    0x74, 0x07,             // 18: je 27
    0x3C, 0x01,             // 20: cmp al, 1
    0x74, 0x0E,             // 22: je 38
    0xF4,                   // 24: hlt
    0xEB, 0xE5,             // 25: jmp 0
    0x26, 0x66, 0x8B, 0x07, // 27: mov eax, es:[bx]
    0xBA, 0x13, 0x00,       // 31: mov dx, 0x13
    0x66, 0xEF,             // 34: out dx, eax
    0xEB, 0xDA,             // 36: jmp 0
    0xBA, 0x14, 0x00,       // 38: mov dx, 0x14
    0x66, 0xED,             // 41: in eax, dx
    0x26, 0x66, 0x89, 0x07, // 43: mov es:[bx], eax
    0xBA, 0x13, 0x00,       // 47: mov dx, 0x13
    0x66, 0xEF,             // 50: out dx, eax
    0xEB, 0xCA,             // 52: jmp 0
];

/// Exits the guest took, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestExits {
    /// Port I/O exits (the command protocol).
    pub io: u64,
    /// Emulated accesses to holes or read-only pages served by the mirror.
    pub mmio: u64,
    /// `KVM_EXIT_MEMORY_FAULT` exits served by the mirror.
    pub memory_fault: u64,
    /// Instruction fetches from a hole (emulation failures) served by
    /// faulting in the page at CS:IP.
    pub fetch_fault: u64,
}

enum Cmd {
    Read,
    Write(u32),
}

/// The guest's vCPU and its command loop.
#[derive(Debug)]
pub struct RealModeGuest {
    vcpu: VcpuFd,
    exits: GuestExits,
}

impl RealModeGuest {
    /// Create vCPU `id` of the mirror's VM, load [`PROGRAM`] at
    /// [`CODE_GPA`] (through the mirror, so into the frame the primary maps
    /// there, or into the VMM's guest RAM) and point the vCPU at it in real
    /// mode.
    ///
    /// # Errors
    /// [`KvmError::Kvm`] when a vCPU ioctl fails; mirror errors when
    /// `CODE_GPA` is not mirrored.
    pub fn new<M: GuestMemoryExits + ?Sized>(mirror: &M, id: u64) -> Result<Self, KvmError> {
        if !mirror.mmio_write(CODE_GPA, &PROGRAM)? {
            return Err(KvmError::Unmapped(CODE_GPA));
        }
        let vcpu = mirror
            .vm()
            .create_vcpu(id)
            .map_err(|e| KvmError::kvm("KVM_CREATE_VCPU", e))?;
        let mut sregs = vcpu
            .get_sregs()
            .map_err(|e| KvmError::kvm("KVM_GET_SREGS", e))?;
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        vcpu.set_sregs(&sregs)
            .map_err(|e| KvmError::kvm("KVM_SET_SREGS", e))?;
        let mut regs = vcpu
            .get_regs()
            .map_err(|e| KvmError::kvm("KVM_GET_REGS", e))?;
        regs.rip = CODE_GPA;
        regs.rflags = 2;
        vcpu.set_regs(&regs)
            .map_err(|e| KvmError::kvm("KVM_SET_REGS", e))?;
        Ok(Self {
            vcpu,
            exits: GuestExits::default(),
        })
    }

    /// The vCPU.
    pub fn vcpu(&mut self) -> &mut VcpuFd {
        &mut self.vcpu
    }

    /// Exits taken so far.
    pub fn exits(&self) -> GuestExits {
        self.exits
    }

    /// Have the guest read the 4 bytes at `gpa` and report them.
    ///
    /// # Errors
    /// [`KvmError::Range`]-like [`KvmError::Unmapped`] for `gpa` above the
    /// first MiB, fault errors of the mirror, [`KvmError::UnexpectedExit`].
    pub fn read_u32<M: GuestMemoryExits + ?Sized>(
        &mut self,
        mirror: &M,
        gpa: u64,
    ) -> Result<u32, KvmError> {
        self.command(mirror, gpa, Cmd::Read)
    }

    /// Have the guest write `val` (4 bytes) at `gpa`.
    ///
    /// # Errors
    /// As [`Self::read_u32`].
    pub fn write_u32<M: GuestMemoryExits + ?Sized>(
        &mut self,
        mirror: &M,
        gpa: u64,
        val: u32,
    ) -> Result<(), KvmError> {
        self.command(mirror, gpa, Cmd::Write(val)).map(drop)
    }

    fn command<M: GuestMemoryExits + ?Sized>(
        &mut self,
        mirror: &M,
        gpa: u64,
        cmd: Cmd,
    ) -> Result<u32, KvmError> {
        if gpa + 4 > 0x10_0000 {
            return Err(KvmError::Unmapped(gpa));
        }
        let seg = ((gpa >> 16) << 12) as u16;
        let off = (gpa & 0xffff) as u16;
        let mut fetch_retries = 0;
        loop {
            let exit = self.vcpu.run();
            match exit {
                Ok(VcpuExit::IoIn(port, data)) => {
                    self.exits.io += 1;
                    let v: u32 = match port {
                        PORT_SEG => seg.into(),
                        PORT_OFF => off.into(),
                        PORT_CMD => match cmd {
                            Cmd::Read => 0,
                            Cmd::Write(_) => 1,
                        },
                        PORT_WDATA => match cmd {
                            Cmd::Write(v) => v,
                            Cmd::Read => 0,
                        },
                        p => return Err(KvmError::UnexpectedExit(format!("in from port {p:#x}"))),
                    };
                    let n = data.len().min(4);
                    data[..n].copy_from_slice(&v.to_le_bytes()[..n]);
                }
                Ok(VcpuExit::IoOut(PORT_DATA, data)) => {
                    self.exits.io += 1;
                    let mut b = [0u8; 4];
                    let n = data.len().min(4);
                    b[..n].copy_from_slice(&data[..n]);
                    return Ok(u32::from_le_bytes(b));
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    self.exits.mmio += 1;
                    if !mirror.mmio_read(addr, data)? {
                        return Err(KvmError::UnexpectedExit(format!("mmio read at {addr:#x}")));
                    }
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    self.exits.mmio += 1;
                    if !mirror.mmio_write(addr, data)? {
                        return Err(KvmError::UnexpectedExit(format!("mmio write at {addr:#x}")));
                    }
                }
                Ok(VcpuExit::MemoryFault { gpa, .. }) => {
                    self.exits.memory_fault += 1;
                    // No access type in the exit: fault for read first; a
                    // second exit on a present read-only page is a write.
                    let write = mirror.read_only(gpa);
                    mirror.handle_fault(gpa, write)?;
                }
                Ok(VcpuExit::InternalError) if fetch_retries < 2 => {
                    // An instruction fetch from a hole: fault in CS:IP's page.
                    fetch_retries += 1;
                    self.exits.fetch_fault += 1;
                    let regs = self
                        .vcpu
                        .get_regs()
                        .map_err(|e| KvmError::kvm("KVM_GET_REGS", e))?;
                    let sregs = self
                        .vcpu
                        .get_sregs()
                        .map_err(|e| KvmError::kvm("KVM_GET_SREGS", e))?;
                    let ip = sregs.cs.base + regs.rip;
                    mirror.handle_fault(ip & !(PAGE_SIZE - 1), false)?;
                    // The instruction may straddle into the next page, which
                    // may lie outside every region: best effort.
                    let next = (ip + 15) & !(PAGE_SIZE - 1);
                    if next != ip & !(PAGE_SIZE - 1) {
                        let _ = mirror.handle_fault(next, false);
                    }
                }
                Ok(other) => return Err(KvmError::UnexpectedExit(format!("{other:?}"))),
                Err(e) => return Err(KvmError::kvm("KVM_RUN", e)),
            }
        }
    }
}
