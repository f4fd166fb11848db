//! Handing back the code pages only start-up used.
//!
//! Start-up runs code the sidecar never runs again: argument parsing for every mode of the one
//! binary, configuration, key loading, the first SSH handshake. Each page of the executable it
//! touches stays mapped, and the kernel maps up to 64 KiB around every such page (fault-around),
//! so an idle agent kept 7.9 MB of the binary resident. Once the tunnels are up the agent asks
//! the kernel to drop its mappings of the executable's read-only pages (`MADV_PAGEOUT`); the
//! pages it still runs come back at their next touch, read from the page cache, and an idle
//! agent settles at about half (docs/performance.md). Pages other processes map (the same image
//! in other pods on the node) are left alone by the kernel.

use std::ops::Range;
use std::path::Path;

/// The read-only, file-backed mappings of `exe` in a `/proc/PID/maps` listing: the code and the
/// constants. Writable mappings (data, relocated tables) are never touched: they hold state.
pub fn executable_mappings(maps: &str, exe: &Path) -> Vec<Range<usize>> {
    maps.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (range, perms) = (fields.next()?, fields.next()?);
            let path = fields.nth(3)?;
            if Path::new(path) != exe || !perms.starts_with('r') || perms.as_bytes().get(1) != Some(&b'-') {
                return None;
            }
            let (start, end) = range.split_once('-')?;
            let (start, end) = (usize::from_str_radix(start, 16).ok()?, usize::from_str_radix(end, 16).ok()?);
            (start < end).then_some(start..end)
        })
        .collect()
}

/// Advises the kernel to page out this process's mappings of its own executable's read-only
/// pages; the bytes advised. An error (a kernel before 5.4 knows no MADV_PAGEOUT) changes
/// nothing but the figure.
#[cfg(target_os = "linux")]
pub fn page_out_own_executable() -> std::io::Result<usize> {
    let exe = std::fs::read_link("/proc/self/exe")?;
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    let mut advised = 0;
    for range in executable_mappings(&maps, &exe) {
        let len = range.end - range.start;
        // SAFETY: advice only. The range is a whole read-only, file-backed private mapping of
        // this process's executable, taken from /proc/self/maps: nothing in it can be written,
        // and MADV_PAGEOUT neither frees nor changes memory -- a paged-out page is read again,
        // with the same bytes, from the file at its next touch.
        let rc = unsafe { libc::madvise(range.start as *mut libc::c_void, len, libc::MADV_PAGEOUT) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        advised += len;
    }
    Ok(advised)
}

#[cfg(not(target_os = "linux"))]
pub fn page_out_own_executable() -> std::io::Result<usize> {
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
00400000-00483000 r--p 00000000 fe:01 1234 /picotun
00483000-01000000 r-xp 00083000 fe:01 1234 /picotun
01000000-01300000 r--p 00c00000 fe:01 1234 /picotun
01322000-0133f000 rw-p 00f22000 fe:01 1234 /picotun
0133f000-01360000 rw-p 00000000 00:00 0 [heap]
7f0000000000-7f0000021000 r--p 00000000 fe:01 99 /other
7ffd0000-7ffd2000 r-xp 00000000 00:00 0 [vdso]
";

    #[test]
    fn only_the_executables_read_only_mappings_are_advised() {
        let ranges = executable_mappings(MAPS, Path::new("/picotun"));
        assert_eq!(ranges, vec![0x400000..0x483000, 0x483000..0x1000000, 0x1000000..0x1300000]);
    }

    #[test]
    fn a_path_with_spaces_or_nothing_matching_gives_nothing() {
        assert!(executable_mappings(MAPS, Path::new("/elsewhere")).is_empty());
        assert!(executable_mappings("garbage\n\n00-zz r--p 0 0 0 /picotun\n", Path::new("/picotun")).is_empty());
    }

    #[test]
    fn paging_out_this_test_binary_works_and_it_keeps_running() {
        let advised = page_out_own_executable().expect("MADV_PAGEOUT on this kernel");
        assert!(advised > 0);
        // The code just paged out runs again.
        assert_eq!(executable_mappings(MAPS, Path::new("/picotun")).len(), 3);
    }
}
