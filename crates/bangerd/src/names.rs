//! Generated names: friendly adjective-noun VM names and short random ids (used for tap and
//! run-directory names, which have tight length limits).

use rand::seq::IndexedRandom;
use rand::Rng;

const ADJECTIVES: &[&str] = &[
    "amber", "brave", "calm", "crisp", "dusty", "eager", "fuzzy", "gentle", "happy", "icy",
    "jolly", "keen", "lucky", "mellow", "nimble", "olive", "proud", "quiet", "rapid", "shiny",
    "tidy", "urban", "vivid", "witty", "young", "zesty",
];
const NOUNS: &[&str] = &[
    "badger", "cedar", "dingo", "falcon", "gecko", "heron", "ibis", "jackal", "koala", "lemur",
    "marten", "newt", "otter", "panda", "quail", "raven", "salmon", "tapir", "urchin", "viper",
    "walrus", "yak", "zebra", "comet", "delta", "ember",
];

/// A name like `brave-otter` that `taken` does not reject (a numeric suffix if all are taken).
pub fn generate(taken: impl Fn(&str) -> bool) -> String {
    let mut rng = rand::rng();
    for _ in 0..64 {
        let name = format!(
            "{}-{}",
            ADJECTIVES.choose(&mut rng).unwrap_or(&"banger"),
            NOUNS.choose(&mut rng).unwrap_or(&"vm")
        );
        if !taken(&name) {
            return name;
        }
    }
    loop {
        let name = format!("vm-{}", short_id());
        if !taken(&name) {
            return name;
        }
    }
}

/// Eight random lowercase hex digits.
pub fn short_id() -> String {
    format!("{:08x}", rand::rng().random::<u32>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_names_are_valid_and_avoid_taken_ones() {
        for _ in 0..100 {
            let n = generate(|n| n.starts_with('a'));
            assert!(banger_api::validate_name("vm", &n).is_ok(), "{n}");
            assert!(!n.starts_with('a'));
        }
        assert!(generate(|n| !n.starts_with("vm-")).starts_with("vm-"));
        assert_eq!(short_id().len(), 8);
    }
}
