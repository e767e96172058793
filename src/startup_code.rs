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
/// included, are never touched: their pages differ from the file's.
pub fn release() -> std::io::Result<usize> {
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
    let bias = headers
        .iter()
        .find(|h| h.p_type == libc::PT_PHDR)
        .map_or(0, |h| phdr.wrapping_sub(h.p_vaddr as usize));
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
        // Whole pages inside the segment only: a page it shares with a writable one stays.
        let start = (bias + h.p_vaddr as usize).next_multiple_of(page);
        let end = (bias + (h.p_vaddr + h.p_memsz) as usize) / page * page;
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
