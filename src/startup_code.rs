//! Gives back the executable's pages that only start-up ran.
//!
//! The kernel maps a program's code 64 KiB at a time around each page it faults in, so parsing
//! the command line and the configuration, compiling plugins and setting up TLS, whose code is
//! spread over a text segment of tens of megabytes, leave more than half of an idle gateway's
//! resident memory mapped to code it will not run again. Those pages are clean and private:
//! `MADV_DONTNEED` only takes them out of this process's page tables (they stay in the page
//! cache), and the next use of any of them maps it back in from memory.

/// Unmaps the executable's read-only segments (code, constants, unwind tables) from this
/// process; returns how many bytes were asked back. Writable segments, the relocated ones
/// included, are never touched: their pages differ from the file's. Nothing is released
/// under a debugger (its breakpoints are written into code pages, which a release would
/// undo) or when the headers do not say where the program was loaded.
// Never inlined: `--write-link-order` (benches/gateway.rs) counts from its first instruction.
#[inline(never)]
pub fn release() -> std::io::Result<usize> {
    if traced() {
        return Ok(0);
    }
    // SAFETY: `getauxval` only reads the auxiliary vector the kernel gave this process.
    let (phdr, phnum) = unsafe {
        (
            libc::getauxval(libc::AT_PHDR) as usize,
            libc::getauxval(libc::AT_PHNUM) as usize,
        )
    };
    if phdr == 0 || phnum == 0 {
        return Ok(0);
    }
    // SAFETY: AT_PHDR and AT_PHNUM describe the main program's headers, which the loader
    // mapped read-only for the life of the process.
    let headers = unsafe { std::slice::from_raw_parts(phdr as *const libc::Elf64_Phdr, phnum) };
    // A position-independent executable is loaded at an offset from its link addresses,
    // known from where its own headers landed; without PT_PHDR it is not relocated.
    let Some(bias) = headers
        .iter()
        .find(|h| h.p_type == libc::PT_PHDR)
        .map(|h| phdr.wrapping_sub(h.p_vaddr as usize))
    else {
        return Ok(0);
    };
    // Code the loader had to patch (text relocations) differs from the file: keep it all.
    if text_relocated(headers, bias) {
        return Ok(0);
    }
    // SAFETY: sysconf has no preconditions.
    let page = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as usize,
        _ => return Ok(0),
    };
    let mut released = 0;
    for h in headers
        .iter()
        .filter(|h| h.p_type == libc::PT_LOAD && h.p_flags & libc::PF_W == 0)
    {
        // Whole pages of what the file holds only: a page shared with a writable segment, or
        // the zeroed tail past the file's bytes, stays.
        let start = (bias + h.p_vaddr as usize).next_multiple_of(page);
        let end = (bias + (h.p_vaddr + h.p_filesz) as usize) / page * page;
        if end <= start {
            continue;
        }
        // SAFETY: the range lies within a read-only, file-backed, private mapping of this
        // executable that nothing writes to; dropping its pages loses nothing, since each is
        // read again from the file (the page cache) when next used.
        let done =
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
        if done != 0 {
            return Err(std::io::Error::last_os_error());
        }
        released += end - start;
    }
    Ok(released)
}

/// Whether a debugger or tracer is attached (`TracerPid` in `/proc/self/status`).
fn traced() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|l| l.strip_prefix("TracerPid:"))
            .is_some_and(|pid| pid.trim() != "0")
    })
}

/// Whether the dynamic section asks for text relocations (`DT_TEXTREL`, or `DF_TEXTREL` in
/// `DT_FLAGS`).
fn text_relocated(headers: &[libc::Elf64_Phdr], bias: usize) -> bool {
    const DT_NULL: i64 = 0;
    const DT_TEXTREL: i64 = 22;
    const DT_FLAGS: i64 = 30;
    const DF_TEXTREL: u64 = 0x4;
    let Some(dynamic) = headers.iter().find(|h| h.p_type == libc::PT_DYNAMIC) else {
        return false;
    };
    // An Elf64_Dyn: a tag and a value, each 8 bytes.
    let count = dynamic.p_memsz as usize / 16;
    // SAFETY: PT_DYNAMIC describes the dynamic section, mapped for the life of the process.
    let entries = unsafe {
        std::slice::from_raw_parts((bias + dynamic.p_vaddr as usize) as *const [u64; 2], count)
    };
    entries
        .iter()
        .map(|&[tag, value]| (tag as i64, value))
        .take_while(|&(tag, _)| tag != DT_NULL)
        .any(|(tag, value)| tag == DT_TEXTREL || (tag == DT_FLAGS && value & DF_TEXTREL != 0))
}

#[cfg(test)]
mod tests {
    fn resident_file_kib() -> u64 {
        std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("RssFile:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap()
    }

    #[test]
    fn released_code_pages_leave_the_process_and_come_back_when_run() {
        let before = resident_file_kib();
        let released = super::release().unwrap();
        assert!(released > 0, "the test binary has read-only segments");
        let after = resident_file_kib();
        assert!(
            after < before,
            "resident file pages {before} KiB → {after} KiB"
        );
        // Code, constants and unwinding all still work: each page faults back in.
        let text = format!("{:?}", (1..100).map(|n| n * 3).collect::<Vec<_>>());
        assert!(text.starts_with("[3, 6, 9"));
        let caught = std::panic::catch_unwind(|| panic!("unwinds after release"));
        assert!(caught.is_err());
        assert!(resident_file_kib() > after, "the pages run since came back");
    }
}
