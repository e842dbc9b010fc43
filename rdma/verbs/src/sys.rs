//! The libibverbs calls, behind safe types that release what they hold: the probe's here,
//! the data path's queue pair in [`rc`].
#![allow(unsafe_code)]

mod rc;

use std::ffi::CStr;

use rdma_sys::{
    ___ibv_query_port, ibv_access_flags, ibv_alloc_pd, ibv_close_device, ibv_context,
    ibv_dealloc_pd, ibv_dereg_mr, ibv_device, ibv_device_attr, ibv_free_device_list,
    ibv_get_device_list, ibv_get_device_name, ibv_gid, ibv_mtu, ibv_open_device, ibv_port_attr,
    ibv_port_state, ibv_query_device, ibv_query_gid, ibv_reg_mr,
};

pub(crate) use rc::{Completion, Failure, Init, Opcode, POLL_BATCH, RcQp, Rtr, Rts, Work};

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// The devices `ibv_get_device_list` returned, freed on drop.
pub(crate) struct DeviceList {
    list: *mut *mut ibv_device,
    count: usize,
}

impl DeviceList {
    /// The list, or the errno of a failed call (`ENOSYS`: no RDMA subsystem).
    pub(crate) fn get() -> Result<Self, i32> {
        let mut count = 0;
        // SAFETY: `count` is a live c_int the call writes.
        let list = unsafe { ibv_get_device_list(&raw mut count) };
        if list.is_null() {
            return Err(errno());
        }
        Ok(Self {
            list,
            count: count.max(0) as usize,
        })
    }

    pub(crate) fn len(&self) -> usize {
        self.count
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.count == 0
    }

    fn device(&self, index: usize) -> *mut ibv_device {
        assert!(index < self.count);
        // SAFETY: the list holds `count` device pointers (index checked above).
        unsafe { *self.list.add(index) }
    }

    /// The name of device `index`.
    pub(crate) fn name(&self, index: usize) -> String {
        // SAFETY: a device of the live list; the name is a NUL-terminated string it owns.
        let name = unsafe { ibv_get_device_name(self.device(index)) };
        if name.is_null() {
            return String::from("?");
        }
        // SAFETY: non-null, NUL-terminated (above), read before the list is freed.
        unsafe { CStr::from_ptr(name) }
            .to_string_lossy()
            .into_owned()
    }

    /// Opens device `index`, or the errno.
    pub(crate) fn open(&self, index: usize) -> Result<Device, i32> {
        // SAFETY: a device of the live list.
        let context = unsafe { ibv_open_device(self.device(index)) };
        if context.is_null() {
            Err(errno())
        } else {
            Ok(Device { context })
        }
    }
}

impl Drop for DeviceList {
    fn drop(&mut self) {
        // SAFETY: the list from ibv_get_device_list, freed once.
        unsafe { ibv_free_device_list(self.list) };
    }
}

/// A port's MTU as verbs encode it (`enum ibv_mtu`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Mtu(ibv_mtu::Type);

impl Mtu {
    /// In bytes (256 … 4096), or `None` for a value verbs do not define.
    pub(crate) fn bytes(self) -> Option<u32> {
        (ibv_mtu::IBV_MTU_256..=ibv_mtu::IBV_MTU_4096)
            .contains(&self.0)
            .then(|| 128 << self.0)
    }
}

/// An open device, closed on drop.
pub(crate) struct Device {
    context: *mut ibv_context,
}

impl Device {
    /// Its number of physical ports (0 if the query fails).
    pub(crate) fn port_count(&self) -> u8 {
        // SAFETY: ibv_device_attr is plain data; all zeroes is a valid value.
        let mut attr: ibv_device_attr = unsafe { std::mem::zeroed() };
        // SAFETY: an open context and a live attribute struct.
        let rc = unsafe { ibv_query_device(self.context, &raw mut attr) };
        if rc == 0 { attr.phys_port_cnt } else { 0 }
    }

    /// The GID table length of `port` if it is active.
    pub(crate) fn active_port_gids(&self, port: u8) -> Option<i32> {
        // SAFETY: ibv_port_attr is plain data; all zeroes is a valid value.
        let mut attr: ibv_port_attr = unsafe { std::mem::zeroed() };
        // SAFETY: an open context and a live attribute struct of the size the call announces.
        let rc = unsafe { ___ibv_query_port(self.context, port, &raw mut attr) };
        (rc == 0 && attr.state == ibv_port_state::IBV_PORT_ACTIVE).then_some(attr.gid_tbl_len)
    }

    /// The active MTU of `port`, or the errno.
    pub(crate) fn active_mtu(&self, port: u8) -> Result<Mtu, i32> {
        // SAFETY: ibv_port_attr is plain data; all zeroes is a valid value.
        let mut attr: ibv_port_attr = unsafe { std::mem::zeroed() };
        // SAFETY: an open context and a live attribute struct of the size the call announces.
        let rc = unsafe { ___ibv_query_port(self.context, port, &raw mut attr) };
        match rc {
            0 => Ok(Mtu(attr.active_mtu)),
            rc if rc > 0 => Err(rc),
            _ => Err(errno()),
        }
    }

    /// GID `index` of `port`.
    pub(crate) fn gid(&self, port: u8, index: i32) -> Option<[u8; 16]> {
        let mut gid = ibv_gid { raw: [0; 16] };
        // SAFETY: an open context and a live ibv_gid.
        let rc = unsafe { ibv_query_gid(self.context, port, index, &raw mut gid) };
        // SAFETY: every bit pattern of the union is a valid byte array.
        let raw = unsafe { gid.raw };
        (rc == 0).then_some(raw)
    }

    /// Whether `bytes` of memory can be registered for local writes (a protection domain and
    /// a memory region, released at once), or the errno.
    pub(crate) fn can_register(&self, bytes: usize) -> Result<(), i32> {
        // SAFETY: an open context.
        let pd = unsafe { ibv_alloc_pd(self.context) };
        if pd.is_null() {
            return Err(errno());
        }
        let mut buffer = vec![0u8; bytes];
        // SAFETY: a live protection domain and a live buffer of `bytes` bytes that outlives
        // the registration (deregistered below).
        let mr = unsafe {
            ibv_reg_mr(
                pd,
                buffer.as_mut_ptr().cast(),
                bytes,
                ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0 as i32,
            )
        };
        let result = if mr.is_null() {
            Err(errno())
        } else {
            // SAFETY: the region just registered, deregistered once.
            unsafe { ibv_dereg_mr(mr) };
            Ok(())
        };
        // SAFETY: the protection domain allocated above, with no region left in it.
        unsafe { ibv_dealloc_pd(pd) };
        result
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        // SAFETY: the context from ibv_open_device, closed once.
        unsafe { ibv_close_device(self.context) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mtus_in_bytes() {
        assert_eq!(Mtu(ibv_mtu::IBV_MTU_256).bytes(), Some(256));
        assert_eq!(Mtu(ibv_mtu::IBV_MTU_1024).bytes(), Some(1024));
        assert_eq!(Mtu(ibv_mtu::IBV_MTU_4096).bytes(), Some(4096));
        assert_eq!(Mtu(0).bytes(), None);
        assert_eq!(Mtu(6).bytes(), None);
    }

    #[test]
    fn failures_name_the_call_and_errno() {
        let failure = Failure {
            call: "ibv_modify_qp to RTR".into(),
            errno: libc::EINVAL,
        };
        let text = failure.to_string();
        assert!(text.starts_with("ibv_modify_qp to RTR: "), "{text}");
        assert!(text.contains("os error 22"), "{text}");
    }
}
