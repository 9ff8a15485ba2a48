rnn::rnn! {
    struct Cell {
        input: 3,
        hidden: 4,
        param W: [hidden, input],
        state h,
        h = tahn(W @ x),
    }
}

fn main() {}
