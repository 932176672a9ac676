//! The accepted ranges of the numeric flags of `edit` and `train`, checked by clap while parsing
//! (so a bad value is named with its flag before anything is loaded) and written in each flag's
//! help as "Range: …".

/// Upper bound of step and epoch counts (`--max_train_steps`, `--checkpointing_steps`, ...):
/// beyond any run this program can finish.
pub const MAX_STEP_COUNT: u64 = 1_000_000_000;

/// Upper bound of `--train_batch_size`: a batch is held in memory whole.
pub const MAX_BATCH_SIZE: u64 = 1024;

/// Upper bound of `--gradient_accumulation_steps`.
pub const MAX_ACCUMULATION: u64 = 10_000;

/// Upper bound of `--lora-rank`: the training library's own limit (the window's runs are held
/// to it too).
pub const MAX_LORA_RANK: u64 = crate::train::lora::MAX_LORA_RANK as u64;

/// Upper bound of `--num_validation_images`: each is a full edit.
pub const MAX_VALIDATION_IMAGES: u64 = 100;

/// A parser for a count flag (a `usize` field) from `low` to `high`, both included.
pub fn count_in(low: u64, high: u64) -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::<usize>::new().range(low..=high)
}

/// A parser for a float flag that must lie between `low` and `high` (each end included or not)
/// and be finite; its message says the range, clap adds the flag and the value.
pub fn float_in(
    low: f64,
    low_included: bool,
    high: f64,
    high_included: bool,
) -> impl Fn(&str) -> Result<f64, String> + Clone + Send + Sync + 'static {
    move |text: &str| {
        let value: f64 = text
            .trim()
            .parse()
            .map_err(|_| format!("`{text}` is not a number"))?;
        let above = if low_included {
            value >= low
        } else {
            value > low
        };
        let below = if high_included {
            value <= high
        } else {
            value < high
        };
        if value.is_finite() && above && below {
            Ok(value)
        } else {
            let low = if low_included {
                format!("at least {low}")
            } else {
                format!("above {low}")
            };
            let high = if high_included {
                format!("at most {high}")
            } else {
                format!("below {high}")
            };
            Err(format!("must be a number {low} and {high}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn float_ranges_name_their_ends() {
        let beta = float_in(0.0, true, 1.0, false);
        assert_eq!(beta("0"), Ok(0.0));
        assert_eq!(beta("0.999"), Ok(0.999));
        assert_eq!(
            beta("1"),
            Err("must be a number at least 0 and below 1".into())
        );
        assert!(beta("NaN").is_err());
        assert!(beta("x").unwrap_err().contains("`x` is not a number"));
        let rate = float_in(0.0, false, 1.0, true);
        assert!(rate("0").is_err());
        assert!(rate("1e30").is_err());
        assert!(rate("inf").is_err());
        assert_eq!(rate("1"), Ok(1.0));
    }

    /// Issue 16 item 4: every numeric flag of `edit` and `train` documents its range in --help.
    #[test]
    fn every_numeric_flag_states_its_range() {
        let cli = super::super::Cli::command();
        let mut checked = 0;
        for name in ["edit", "train"] {
            let sub = cli.find_subcommand(name).expect("subcommand");
            for arg in sub.get_arguments() {
                let numeric = arg.get_value_names().is_some_and(|names| {
                    names
                        .iter()
                        .any(|n| ["N", "F", "P", "PX"].contains(&n.as_str()))
                });
                if !numeric {
                    continue;
                }
                let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
                assert!(
                    help.contains("Range: "),
                    "{name} --{}: no range in its help: {help:?}",
                    arg.get_long().unwrap_or_default()
                );
                checked += 1;
            }
        }
        assert!(checked >= 25, "only {checked} numeric flags found");
        // The ranges written by hand in the help match the limits in the code.
        let help_of = |sub: &str, long: &str| {
            let sub = cli.find_subcommand(sub).expect("subcommand");
            let arg = sub
                .get_arguments()
                .find(|a| a.get_long() == Some(long))
                .expect("flag");
            arg.get_help().map(|h| h.to_string()).unwrap_or_default()
        };
        use crate::pipeline::settings::{MAX_GUIDANCE, MAX_STEPS};
        for (sub, long, range) in [
            ("edit", "steps", format!("Range: 1 to {MAX_STEPS}")),
            (
                "edit",
                "guidance-scale",
                format!("Range: 0 to {MAX_GUIDANCE}"),
            ),
            (
                "edit",
                "image-guidance-scale",
                format!("Range: 0 to {MAX_GUIDANCE}"),
            ),
            (
                "train",
                "resolution",
                format!("Range: 8 to {}", crate::train::run::MAX_RESOLUTION),
            ),
            ("train", "lora-rank", format!("Range: 1 to {MAX_LORA_RANK}")),
            (
                "train",
                "train_batch_size",
                format!("Range: 1 to {MAX_BATCH_SIZE}"),
            ),
            (
                "train",
                "max_train_steps",
                format!("Range: 1 to {MAX_STEP_COUNT}"),
            ),
            (
                "train",
                "num_validation_images",
                format!("Range: 1 to {MAX_VALIDATION_IMAGES}"),
            ),
            (
                "train",
                "gradient_accumulation_steps",
                format!("Range: 1 to {MAX_ACCUMULATION}"),
            ),
        ] {
            let help = help_of(sub, long);
            assert!(
                help.contains(&range),
                "{sub} --{long}: {help:?} lacks {range:?}"
            );
        }
    }
}
