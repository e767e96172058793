//! The link order `build.rs` hands the linker (`deploy/link-order.txt`) is what the linker and
//! the bench's writer expect: a block per build, each a list of symbol names, one per line.

use std::collections::{BTreeMap, HashSet};

const ORDER: &str = include_str!("../deploy/link-order.txt");

/// The blocks, by build name, in file order of their names.
fn blocks() -> BTreeMap<&'static str, Vec<&'static str>> {
    let mut blocks = BTreeMap::new();
    let mut current: Option<&str> = None;
    for line in ORDER.lines() {
        if let Some(name) = line.strip_prefix("# profile: ") {
            assert!(
                blocks.insert(name, Vec::new()).is_none(),
                "block {name:?} appears twice"
            );
            current = Some(name);
        } else if line.starts_with('#') {
            assert!(current.is_none(), "a comment inside a block: {line:?}");
        } else {
            let block = current.unwrap_or_else(|| panic!("a name before any block: {line:?}"));
            blocks.get_mut(block).unwrap().push(line);
        }
    }
    blocks
}

#[test]
fn every_build_has_a_block_of_symbol_names() {
    let blocks = blocks();
    for build in ["bench", "release", "production"] {
        let names = blocks
            .get(build)
            .unwrap_or_else(|| panic!("no block for the {build} build"));
        // A serving gateway runs well over a thousand functions; far fewer means a broken run.
        assert!(names.len() > 1000, "{build}: only {} names", names.len());
        let mut seen = HashSet::new();
        for name in names {
            // Not valgrind's names: its recursion levels (`f'2`), addresses, "(below main)".
            assert!(
                !name.is_empty()
                    && !name.contains(|c: char| c.is_whitespace() || c == '\'')
                    && !name.starts_with(['(', '?'])
                    && !name.starts_with("0x"),
                "{build}: not a symbol name: {name:?}"
            );
            assert!(seen.insert(name), "{build}: {name} twice");
        }
    }
}

#[test]
fn the_blocks_name_the_same_serving_code() {
    // Hashes differ between builds; the functions (their names without the hash) do not, but
    // for what whole-program optimization inlines in the production build.
    let unhashed = |names: &[&str]| -> HashSet<String> {
        names
            .iter()
            .filter(|n| n.starts_with("_ZN9gatehouse"))
            .map(|n| n.rsplit_once("17h").map_or(*n, |(head, _)| head).to_owned())
            .collect()
    };
    let blocks = blocks();
    let bench = unhashed(&blocks["bench"]);
    for build in ["release", "production"] {
        let other = unhashed(&blocks[build]);
        let shared = bench.intersection(&other).count();
        assert!(
            shared * 2 > other.len(),
            "{build} shares {shared} of its {} gatehouse functions with bench",
            other.len()
        );
    }
}
