//! Is an executable static? The image is `FROM scratch`: there is no dynamic loader and no
//! libc in it, so a binary that names an interpreter (`PT_INTERP`) or a shared library
//! (`DT_NEEDED`) would fail to start with a bare "no such file or directory".
//!
//! Only what that question needs of ELF64 little-endian (x86-64) is read here.

use std::fs;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};

const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;
const ET_EXEC: u16 = 2;
/// Also what a static position-independent executable is (Rust's musl default).
const ET_DYN: u16 = 3;
const EM_X86_64: u16 = 62;

/// How an executable gets loaded.
#[derive(Debug, PartialEq, Eq)]
pub struct Linkage {
    /// The dynamic loader it asks the kernel for, if any.
    pub interpreter: Option<String>,
    /// How many shared libraries it names.
    pub needed: usize,
}

impl Linkage {
    pub fn is_static(&self) -> bool {
        self.interpreter.is_none() && self.needed == 0
    }
}

/// Fails unless `path` is an x86-64 executable that needs no loader and no shared library.
pub fn check_static(path: &Path) -> Result<()> {
    let bytes = fs::read(path).with_context(|| format!("read {}", path.display()))?;
    let linkage = linkage(&bytes)
        .with_context(|| format!("{} is no ELF64 x86-64 executable", path.display()))?;
    if !linkage.is_static() {
        bail!(
            "{} is not static: interpreter {:?}, {} shared libraries needed",
            path.display(),
            linkage.interpreter,
            linkage.needed
        );
    }
    Ok(())
}

pub fn linkage(elf: &[u8]) -> Result<Linkage> {
    ensure!(elf.get(..4) == Some(b"\x7fELF"), "no ELF magic");
    ensure!(elf[4] == 2 && elf[5] == 1, "not 64-bit little-endian");
    let kind = u16_at(elf, 16)?;
    ensure!(
        kind == ET_EXEC || kind == ET_DYN,
        "not an executable (e_type {kind})"
    );
    let machine = u16_at(elf, 18)?;
    ensure!(machine == EM_X86_64, "not x86-64 (e_machine {machine})");
    let phoff = usize_at(elf, 32)?;
    let phentsize = usize::from(u16_at(elf, 54)?);
    let phnum = usize::from(u16_at(elf, 56)?);
    ensure!(
        phentsize >= 56 || phnum == 0,
        "program headers of {phentsize} bytes"
    );

    let mut linkage = Linkage {
        interpreter: None,
        needed: 0,
    };
    for i in 0..phnum {
        let header = phoff + i * phentsize;
        let offset = usize_at(elf, header + 8)?;
        let size = usize_at(elf, header + 32)?;
        let contents = elf
            .get(offset..offset.saturating_add(size))
            .context("a segment lies past the end of the file")?;
        match u32_at(elf, header)? {
            PT_INTERP => {
                let path = contents.split(|b| *b == 0).next().unwrap_or_default();
                linkage.interpreter = Some(String::from_utf8_lossy(path).into_owned());
            }
            PT_DYNAMIC => {
                for entry in contents.chunks_exact(16) {
                    match u64_at(entry, 0)? {
                        DT_NULL => break,
                        DT_NEEDED => linkage.needed += 1,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Ok(linkage)
}

fn bytes_at<const N: usize>(data: &[u8], offset: usize) -> Result<[u8; N]> {
    data.get(offset..offset + N)
        .and_then(|b| b.try_into().ok())
        .context("truncated ELF file")
}

fn u16_at(data: &[u8], offset: usize) -> Result<u16> {
    bytes_at(data, offset).map(u16::from_le_bytes)
}

fn u32_at(data: &[u8], offset: usize) -> Result<u32> {
    bytes_at(data, offset).map(u32::from_le_bytes)
}

fn u64_at(data: &[u8], offset: usize) -> Result<u64> {
    bytes_at(data, offset).map(u64::from_le_bytes)
}

fn usize_at(data: &[u8], offset: usize) -> Result<usize> {
    let value = u64_at(data, offset)?;
    usize::try_from(value).context("offset out of range")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An ELF header of the given type with no program headers: what a static executable
    /// looks like to these checks.
    fn header(kind: u16) -> Vec<u8> {
        let mut elf = vec![0; 64];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        elf[16..18].copy_from_slice(&kind.to_le_bytes());
        elf[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        elf[54..56].copy_from_slice(&56u16.to_le_bytes());
        elf
    }

    #[test]
    fn the_test_binary_itself_is_dynamic() {
        // Built for the host's glibc target: it has a loader and needs libc.
        let exe = fs::read("/proc/self/exe").unwrap();
        let linkage = linkage(&exe).unwrap();
        assert!(linkage.interpreter.unwrap().contains("ld-linux"));
        assert!(linkage.needed > 0);
    }

    #[test]
    fn no_program_headers_is_static() {
        for kind in [ET_EXEC, ET_DYN] {
            assert!(linkage(&header(kind)).unwrap().is_static());
        }
    }

    #[test]
    fn an_interpreter_segment_is_found() {
        let mut elf = header(ET_DYN);
        let interp = b"/lib/ld-musl-x86_64.so.1\0";
        // One program header at 64, its contents at 120.
        elf[32..40].copy_from_slice(&64u64.to_le_bytes());
        elf[56..58].copy_from_slice(&1u16.to_le_bytes());
        let mut ph = [0u8; 56];
        ph[..4].copy_from_slice(&PT_INTERP.to_le_bytes());
        ph[8..16].copy_from_slice(&120u64.to_le_bytes());
        ph[32..40].copy_from_slice(&(interp.len() as u64).to_le_bytes());
        elf.extend_from_slice(&ph);
        elf.extend_from_slice(interp);
        let linkage = linkage(&elf).unwrap();
        assert_eq!(
            linkage.interpreter.as_deref(),
            Some("/lib/ld-musl-x86_64.so.1")
        );
        assert!(!linkage.is_static());
    }

    #[test]
    fn other_files_are_refused() {
        assert!(linkage(b"#!/bin/sh\n").is_err());
        assert!(linkage(&header(1)).is_err(), "a relocatable object");
        let mut truncated = header(ET_EXEC);
        truncated[56..58].copy_from_slice(&3u16.to_le_bytes());
        assert!(linkage(&truncated).is_err());
    }
}
