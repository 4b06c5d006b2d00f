//! The host files a dynamically linked program needs to run elsewhere: the shared libraries
//! and the ELF interpreter that `ldd` reports, to be copied to the same paths in L1.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::LabError;

/// Libraries and loader of `program`, as absolute host paths; empty for a static program.
pub fn runtime_files(program: &Path) -> Result<Vec<PathBuf>, LabError> {
    let what = format!("ldd {}", program.display());
    let out = Command::new("ldd")
        .arg(program)
        .output()
        .map_err(|e| LabError::io(what.clone(), e))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // glibc's ldd exits 1 for a static program and says so on stdout (or stderr, by version).
    if stdout.contains("not a dynamic executable") || stderr.contains("not a dynamic executable") {
        return Ok(Vec::new());
    }
    if !out.status.success() {
        return Err(LabError::Tool {
            what,
            status: out.status,
            stderr: stderr.into(),
        });
    }
    parse_ldd(&stdout).map_err(|e| LabError::Invalid(format!("{what}: {e}")))
}

/// Parses lines such as
///   `linux-vdso.so.1 (0x00007ffd...)`            the vDSO, provided by the kernel: skipped
///   `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)`
///   `/lib64/ld-linux-x86-64.so.2 (0x...)`        the interpreter (PT_INTERP)
///   `statically linked`                          a static-pie program: nothing to copy
fn parse_ldd(output: &str) -> Result<Vec<PathBuf>, String> {
    let mut files = Vec::new();
    for line in output.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let path = match line.split_once("=>") {
            Some((lib, target)) => {
                let target = target.trim();
                if target.starts_with("not found") {
                    return Err(format!("{} not found", lib.trim()));
                }
                target.split(" (").next().unwrap_or(target)
            }
            None => line.split(" (").next().unwrap_or(line),
        };
        if path.starts_with('/') {
            files.push(PathBuf::from(path));
        }
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_glibc_ldd_output() {
        let out = "\tlinux-vdso.so.1 (0x00007ffc5a5f2000)\n\
                   \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f0c1c5a0000)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f0c1c200000)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f0c1c600000)\n";
        assert_eq!(
            parse_ldd(out).unwrap(),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
        assert_eq!(
            parse_ldd("\tstatically linked\n").unwrap(),
            Vec::<PathBuf>::new()
        );
    }

    #[test]
    fn a_missing_library_is_an_error() {
        let err = parse_ldd("\tlibfoo.so.1 => not found\n").unwrap_err();
        assert!(err.contains("libfoo.so.1"), "{err}");
    }

    #[test]
    fn finds_the_libraries_of_a_real_program() {
        let files = runtime_files(Path::new("/bin/sh")).unwrap();
        assert!(
            files
                .iter()
                .any(|f| f.to_string_lossy().contains("libc.so")),
            "{files:?}"
        );
        assert!(files.iter().all(|f| f.is_file()), "{files:?}");
    }
}
