//! Shell-style name patterns (`*`, `?`), as msModelSlim's `include` / `exclude` lists use them.
//! A pattern matches the whole module name.

pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti) = (0, 0);
    // Position after the last `*` seen, and the text position it is trying to absorb up to.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi + 1, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn patterns() {
        assert!(glob_match("*", "model.layers.0.mlp.gate"));
        assert!(glob_match("*mlp.gate", "model.layers.0.mlp.gate"));
        assert!(!glob_match("*mlp.gate", "model.layers.0.mlp.gate_proj"));
        assert!(glob_match("*experts*", "model.layers.3.mlp.experts.7.up_proj"));
        assert!(glob_match(
            "model.language_model.layers.*.mlp.down_proj",
            "model.language_model.layers.12.mlp.down_proj"
        ));
        assert!(!glob_match("model.layers.4?.*", "model.layers.4.mlp"));
        assert!(glob_match("model.layers.4?.*", "model.layers.41.mlp"));
        assert!(glob_match("lm_head", "lm_head"));
        assert!(!glob_match("lm_head", "language_model.lm_head"));
        assert!(glob_match("*lm_head", "language_model.lm_head"));
        assert!(glob_match("a*b*c", "a-x-b-y-c"));
        assert!(!glob_match("a*b*c", "a-x-b-y-d"));
    }
}
