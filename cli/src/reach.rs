//! Whether `LD_PRELOAD` can reach a program at all. The shim only sees programs the dynamic
//! loader starts with it: a statically linked program has no loader, a Go program makes its
//! socket calls as raw syscalls, and the loader ignores `LD_PRELOAD` for set-user-ID programs
//! run by another user. Such workloads run on the kernel default; `stackroute run` and
//! `stackroute explain --program` say so instead of pretending.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use object::read::elf::{ElfFile64, FileHeader, ProgramHeader};
use object::{Endianness, Object};

/// Why the shim cannot reach a program, or `None` when it can.
pub(crate) fn unreachable_reason(program: &Path) -> Result<Option<&'static str>> {
    let metadata = std::fs::metadata(program)
        .with_context(|| format!("{}: cannot read", program.display()))?;
    let mode = metadata.permissions().mode();
    // Secure execution applies when the file would change who runs it.
    let set_id = mode & 0o4000 != 0 && metadata.uid() != current_uid()
        || mode & 0o2000 != 0 && metadata.gid() != current_gid();
    if set_id {
        return Ok(Some(
            "set-user-ID or set-group-ID program: the loader ignores LD_PRELOAD",
        ));
    }
    let data =
        std::fs::read(program).with_context(|| format!("{}: cannot read", program.display()))?;
    let Ok(elf) = ElfFile64::<Endianness>::parse(&*data) else {
        // Not a 64-bit ELF file: a script (its interpreter is what runs) or another format.
        return Ok(None);
    };
    if elf.section_by_name(".go.buildinfo").is_some()
        || elf.section_by_name(".note.go.buildid").is_some()
    {
        return Ok(Some(
            "Go program: its runtime makes socket calls as raw syscalls",
        ));
    }
    let endian = elf.endian();
    let has_interpreter = elf
        .elf_program_headers()
        .iter()
        .any(|header| header.p_type(endian) == object::elf::PT_INTERP);
    let is_executable = elf.elf_header().e_type(endian) == object::elf::ET_EXEC
        || elf.elf_header().e_type(endian) == object::elf::ET_DYN;
    if is_executable && !has_interpreter {
        return Ok(Some(
            "statically linked program: no dynamic loader to preload the shim",
        ));
    }
    Ok(None)
}

/// The file `program` names, searched in `PATH` as `execvp` does when it has no slash.
pub(crate) fn resolve(program: &Path) -> Option<PathBuf> {
    if program.components().count() > 1 {
        return Some(program.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| {
            candidate
                .metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

fn current_uid() -> u32 {
    rustix::process::getuid().as_raw()
}

fn current_gid() -> u32 {
    rustix::process::getgid().as_raw()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dynamically_linked_program_is_reachable() {
        let sh = resolve(Path::new("sh")).expect("sh in PATH");
        assert_eq!(unreachable_reason(&sh).unwrap(), None);
    }

    #[test]
    fn a_script_is_left_to_its_interpreter() {
        let dir = std::env::temp_dir().join(format!("sr-reach-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("s.sh");
        std::fs::write(&script, "#!/bin/sh\ntrue\n").unwrap();
        assert_eq!(unreachable_reason(&script).unwrap(), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_program_is_an_error() {
        assert!(unreachable_reason(Path::new("/nonexistent/program")).is_err());
    }
}
