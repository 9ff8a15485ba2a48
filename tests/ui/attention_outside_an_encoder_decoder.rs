rnn::lstm! {
    pub struct CharModel {
        vocab: 65,
        input: 32,
        hidden: 128,
        head: 65,
        attention: general,
    }
}

fn main() {}
