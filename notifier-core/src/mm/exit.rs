//! `exit` (`exit_mmap`): release the notifiers, then tear everything down.

use super::{Mm, TASK_SIZE};
use crate::notifier::Event;

impl Mm {
    /// Tear the address space down: `release` to every subscriber first
    /// (`mmu_notifier_release`: after it no callback runs), then unmap
    /// everything and free the tables. Later operations fail with
    /// [`super::MmError::Exited`]. A second call does nothing.
    ///
    /// # Locking
    /// Releases the notifiers without any lock held, then takes the mmap
    /// lock exclusively.
    pub fn exit(&self) {
        let _ = self.try_exit();
    }

    /// [`Mm::exit`], reporting a subscriber whose `release` panicked (it is
    /// failed; the teardown completed all the same).
    ///
    /// # Errors
    /// [`super::MmError::Notifier`] with
    /// [`crate::notifier::NotifierError::SubscriberPanicked`].
    pub fn try_exit(&self) -> Result<(), super::MmError> {
        if self.state.read().exited {
            return Ok(());
        }
        let released = self.notifiers().try_release();
        let mut st = self.state.write();
        if st.exited {
            return Ok(released?);
        }
        st.exited = true;
        if let Ok(mut br) = self.begin(0, TASK_SIZE, Event::Release) {
            for v in st.vmas.values() {
                self.zap_range(&st, v, v.start, v.end, &mut br);
            }
            // release ran first: no subscriber is left to fail.
            let _ = br.end();
        }
        for (_, v) in core::mem::take(&mut st.vmas) {
            v.close();
        }
        st.pt.clear();
        Ok(released?)
    }
}

impl Drop for Mm {
    fn drop(&mut self) {
        self.exit();
    }
}
