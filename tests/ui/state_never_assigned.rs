rnn::rnn! {
    struct Cell {
        input: 3,
        hidden: 4,
        param W: [hidden, input],
        state h,
        state c,
        h = tanh(W @ x),
    }
}

fn main() {}
