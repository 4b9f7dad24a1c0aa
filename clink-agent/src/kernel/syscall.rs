//! Raw `bpf(2)` commands, for what aya 0.14 does not offer in the form needed here:
//!
//! * map element commands on a shared file descriptor: aya's `HashMap::insert` takes
//!   `&mut self`, so sharing one map between connection tasks would need a lock around every
//!   lookup on the hot path, where the kernel already serialises per element;
//! * a cgroup bpf_link's cgroup id and attach type: aya's `LinkInfo` does not expose them.
//!
//! Covered by the kernel tests (`kernel::tests`) and the sockmap end-to-end tests.

use std::{
    io,
    mem::size_of,
    os::fd::{AsRawFd, OwnedFd},
};

pub(super) const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
pub(super) const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
pub(super) const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
/// Update only an existing entry: sockets the programs did not splice have none.
pub(super) const BPF_EXIST: u64 = 2;

#[repr(C)]
struct MapElemAttr {
    map_fd: u32,
    pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// One `bpf(2)` map command on `fd`. `Ok(false)`: no such entry (ENOENT).
pub(super) fn map_cmd<K, V>(
    cmd: libc::c_long,
    fd: &OwnedFd,
    key: &K,
    value: *mut V,
    flags: u64,
) -> io::Result<bool> {
    let attr = MapElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        pad: 0,
        key: (key as *const K) as u64,
        value: value as u64,
        flags,
    };
    // SAFETY: `attr` is a valid `bpf_attr` prefix for the map element commands; the key
    // (and value, where the command uses one) point to live objects of the map's key and
    // value sizes for the duration of the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            &raw const attr,
            size_of::<MapElemAttr>(),
        )
    };
    if ret == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENOENT) => Ok(false),
        _ => Err(e),
    }
}

/// `(cgroup id, attach type)` of a cgroup bpf_link, by raw `bpf(2)` calls: aya's `LinkInfo`
/// does not expose them.
pub(super) fn cgroup_link_info(link_id: u32) -> io::Result<(u64, u32)> {
    use std::os::fd::FromRawFd as _;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
    const BPF_LINK_TYPE_CGROUP: u64 = 3;

    let bpf = |cmd: libc::c_long, attr: &mut [u64; 16]| -> io::Result<libc::c_long> {
        // SAFETY: `attr` is a zeroed `union bpf_attr` prefix of the size passed; the kernel
        // only writes through the pointers we put into it, which point to live buffers.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                attr.as_mut_ptr(),
                std::mem::size_of_val(attr),
            )
        };
        if ret < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(ret)
        }
    };
    // union bpf_attr { struct { __u32 link_id; __u32 next_id; __u32 open_flags; } }
    let mut attr = [0u64; 16];
    attr[0] = u64::from(link_id);
    let fd = bpf(BPF_LINK_GET_FD_BY_ID, &mut attr)?;
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // struct bpf_link_info { __u32 type; __u32 id; __u32 prog_id; union { struct {
    // __u64 cgroup_id; __u32 attach_type; } cgroup; ... } } (the union at offset 16)
    let mut info = [0u64; 4];
    // union bpf_attr { struct { __u32 bpf_fd; __u32 info_len; __aligned_u64 info; } info }
    let mut attr = [0u64; 16];
    attr[0] = fd.as_raw_fd() as u64 | (std::mem::size_of_val(&info) as u64) << 32;
    attr[1] = info.as_mut_ptr() as u64;
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    if info[0] & 0xffff_ffff != BPF_LINK_TYPE_CGROUP {
        return Err(io::Error::other("not a cgroup link"));
    }
    Ok((info[2], (info[3] & 0xffff_ffff) as u32))
}
