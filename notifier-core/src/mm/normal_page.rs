//! `vm_normal_page`: which frame, if any, stands behind a present PTE as a
//! normal (refcounted) page. The decision table of seeds 000 and 001,
//! reproduced row by row; docs/SEMANTICS.md lists the rows with their tests.
//!
//! With `pte_special` (the kernel's `HAVE_PTE_SPECIAL`, the default):
//!
//! | PTE       | VMA / PFN                      | result                     | row |
//! |-----------|--------------------------------|----------------------------|-----|
//! | special   | VMA has a page array           | `pages[(addr-start)>>12]`  | [`Row::SpecialPageArray`] |
//! | special   | `PFNMAP` or `MIXEDMAP`         | none                       | [`Row::SpecialPfnOrMixed`] |
//! | special   | the zero page                  | none                       | [`Row::SpecialZero`] |
//! | special   | anything else                  | none (bad PTE)             | [`Row::SpecialBad`] |
//! | normal    | PFN not a valid frame          | none (bad PTE)             | [`Row::InvalidPfn`] |
//! | normal    | valid frame                    | the frame                  | [`Row::Normal`] |
//!
//! Without `pte_special` (seed 001's linearity rules):
//!
//! | VMA        | PFN                                         | result    | row |
//! |------------|---------------------------------------------|-----------|-----|
//! | `MIXEDMAP` | not `pfn_valid`                             | none      | [`Row::MixedRaw`] |
//! | `MIXEDMAP` | `pfn_valid`                                 | the frame | [`Row::MixedValid`] |
//! | `PFNMAP`   | `pfn == vm_pgoff + (addr-start)>>12`        | none      | [`Row::PfnMapLinear`] |
//! | `PFNMAP`   | not linear, not a COW mapping               | none      | [`Row::PfnMapNotCow`] |
//! | `PFNMAP`   | not linear, COW mapping                     | the frame (a COWed page) | [`Row::PfnMapCowed`] |
//! | other      | the zero page                               | none      | [`Row::Zero`] |
//! | other      | not `pfn_valid`                             | none (bad PTE) | [`Row::InvalidPfn`] |
//! | other      | valid frame                                 | the frame | [`Row::Normal`] |

use super::pte::PresentPte;
use super::vma::{VmFlags, Vma};
use crate::frame::Pfn;

/// The row of the decision table that decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Row {
    /// Special PTE, the VMA has a page array: the array's page (seed 000).
    SpecialPageArray,
    /// Special PTE, page array too short for the offset: none.
    SpecialPageArrayShort,
    /// Special PTE in a `PFNMAP`/`MIXEDMAP` VMA: none.
    SpecialPfnOrMixed,
    /// Special PTE of the zero page: none.
    SpecialZero,
    /// Special PTE anywhere else: none (the kernel prints a bad PTE).
    SpecialBad,
    /// `MIXEDMAP`, raw PFN: none.
    MixedRaw,
    /// `MIXEDMAP`, valid frame: the frame.
    MixedValid,
    /// `PFNMAP`, PFN follows the `remap_pfn_range` rule: none (raw).
    PfnMapLinear,
    /// `PFNMAP`, not linear, not a COW mapping: none.
    PfnMapNotCow,
    /// `PFNMAP`, not linear, COW mapping: the COWed frame.
    PfnMapCowed,
    /// The zero page: none.
    Zero,
    /// PFN beyond the valid frames: none (bad PTE).
    InvalidPfn,
    /// An ordinary page: the frame.
    Normal,
}

/// What `vm_normal_page` needs besides the VMA and the PTE.
#[derive(Clone, Copy)]
pub struct NormalPageEnv<'a> {
    /// Whether PTEs carry the special bit (`HAVE_PTE_SPECIAL`).
    pub pte_special: bool,
    /// The zero page.
    pub zero: Pfn,
    /// `pfn_valid`.
    pub pfn_valid: &'a dyn Fn(Pfn) -> bool,
}

/// The decision and its row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NormalPage {
    /// The normal page, if any.
    pub page: Option<Pfn>,
    /// The row that decided.
    pub row: Row,
}

/// `vm_normal_page(vma, addr, pte)`, with the row that decided.
pub fn vm_normal_page(
    vma: &Vma,
    addr: u64,
    pte: PresentPte,
    env: &NormalPageEnv<'_>,
) -> NormalPage {
    let pfn = pte.pfn;
    let none = |row| NormalPage { page: None, row };
    if env.pte_special {
        if !pte.special {
            return check_pfn(pfn, env);
        }
        if let Some(pages) = &vma.pages {
            return match pages.page(vma.index_of(addr)) {
                Some(p) => NormalPage {
                    page: Some(p),
                    row: Row::SpecialPageArray,
                },
                None => none(Row::SpecialPageArrayShort),
            };
        }
        if vma
            .flags
            .intersects(VmFlags::PFNMAP.union(VmFlags::MIXEDMAP))
        {
            return none(Row::SpecialPfnOrMixed);
        }
        if pfn == env.zero {
            return none(Row::SpecialZero);
        }
        return none(Row::SpecialBad);
    }
    if vma
        .flags
        .intersects(VmFlags::PFNMAP.union(VmFlags::MIXEDMAP))
    {
        if vma.flags.contains(VmFlags::MIXEDMAP) {
            if !(env.pfn_valid)(pfn) {
                return none(Row::MixedRaw);
            }
            return NormalPage {
                page: Some(pfn),
                row: Row::MixedValid,
            };
        }
        if pfn.0 == vma.linear_pgoff(addr) {
            return none(Row::PfnMapLinear);
        }
        if !vma.flags.is_cow_mapping() {
            return none(Row::PfnMapNotCow);
        }
        if pfn == env.zero {
            return none(Row::Zero);
        }
        let d = check_pfn(pfn, env);
        return if d.page.is_some() {
            NormalPage {
                page: d.page,
                row: Row::PfnMapCowed,
            }
        } else {
            d
        };
    }
    if pfn == env.zero {
        return none(Row::Zero);
    }
    check_pfn(pfn, env)
}

#[inline]
fn check_pfn(pfn: Pfn, env: &NormalPageEnv<'_>) -> NormalPage {
    if !(env.pfn_valid)(pfn) {
        return NormalPage {
            page: None,
            row: Row::InvalidPfn,
        };
    }
    NormalPage {
        page: Some(pfn),
        row: Row::Normal,
    }
}

/// Whether the PTE holds a reference on its frame: it is not special and
/// `vm_normal_page` names that very frame. Installing and zapping use the
/// same rule, so references always balance.
#[inline]
pub(crate) fn pte_holds_ref(
    vma: &Vma,
    addr: u64,
    pte: PresentPte,
    env: &NormalPageEnv<'_>,
) -> bool {
    !pte.special && vm_normal_page(vma, addr, pte, env).page == Some(pte.pfn)
}
