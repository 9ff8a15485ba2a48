//! Malformed declarations given to `rnn!`, `lstm!`, `gru!` and `seq2seq!`: each must fail to compile with
//! `compile_error!`s at the offending tokens, saying what is wrong and how to fix it, and
//! nothing else (no follow-on error about the declared struct). The expected compiler output
//! is `tests/ui/<case>.stderr`; regenerate with `TRYBUILD=overwrite cargo test --test ui`.

#[test]
fn malformed_declarations_are_compile_errors_at_the_offending_token() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*.rs");
}
