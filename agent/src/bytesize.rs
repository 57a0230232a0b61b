//! Sizes in bytes as people write them in flags: `65536`, `64KiB`, `1MiB` (also `KB`/`MB` and
//! `K`/`M`, read as powers of 1024, since buffers are sized in those).

/// Parses a size; the message names what is allowed.
pub fn parse(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(digits);
    let allowed = "expected a size in bytes such as 65536, 64KiB or 1MiB";
    let n: usize = number.parse().map_err(|_| format!("{s:?}: {allowed}"))?;
    let scale: usize = match unit.trim() {
        "" | "B" => 1,
        "K" | "KB" | "KiB" | "k" | "kB" => 1 << 10,
        "M" | "MB" | "MiB" => 1 << 20,
        "G" | "GB" | "GiB" => 1 << 30,
        other => return Err(format!("{s:?}: unknown unit {other:?}; {allowed}")),
    };
    n.checked_mul(scale)
        .ok_or_else(|| format!("{s:?}: too large; {allowed}"))
}

/// The shortest exact form: `64KiB`, `1MiB`, or bytes.
pub fn format(n: usize) -> String {
    for (unit, scale) in [("GiB", 1usize << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if n >= scale && n.is_multiple_of(scale) {
            return format!("{}{unit}", n / scale);
        }
    }
    format!("{n}B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bytes_and_binary_units() {
        assert_eq!(parse("65536"), Ok(65536));
        assert_eq!(parse("64KiB"), Ok(64 << 10));
        assert_eq!(parse("4K"), Ok(4096));
        assert_eq!(parse("1MiB"), Ok(1 << 20));
        assert_eq!(parse("2 MB"), Ok(2 << 20));
        assert_eq!(parse("512B"), Ok(512));
    }

    #[test]
    fn bad_sizes_name_the_value_and_what_is_allowed() {
        assert_eq!(
            parse("lots"),
            Err("\"lots\": expected a size in bytes such as 65536, 64KiB or 1MiB".into())
        );
        assert_eq!(
            parse("3TiB"),
            Err(
                "\"3TiB\": unknown unit \"TiB\"; expected a size in bytes such as 65536, 64KiB or 1MiB"
                    .into()
            )
        );
        assert!(parse("99999999999999999999G").is_err());
    }

    #[test]
    fn formats_the_shortest_exact_form() {
        assert_eq!(format(64 << 10), "64KiB");
        assert_eq!(format(1 << 20), "1MiB");
        assert_eq!(format(1500), "1500B");
    }
}
