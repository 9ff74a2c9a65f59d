//! Which products a model gets (`Matmul`), on small random BERT models whose
//! widths AMX tiles can or cannot take.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use jetinfer_bert::{Bert, Config, LoadError, Matmul, Pooling};

/// A one-layer BERT with random weights and the given widths.
fn random_model(hidden: usize, intermediate: usize) -> (HashMap<String, Tensor>, Config) {
    let config = Config {
        vocab_size: 64,
        hidden_size: hidden,
        intermediate_size: intermediate,
        num_attention_heads: 2,
        num_hidden_layers: 1,
        max_position_embeddings: 80,
        type_vocab_size: 2,
        layer_norm_eps: 1e-12,
        hidden_act: "gelu".into(),
        position_embedding_type: "absolute".into(),
    };
    let mut tensors = HashMap::new();
    let mut add = |name: &str, shape: &[usize], scale: f64| {
        let t = (Tensor::randn(0f32, 1f32, shape, &Device::Cpu).unwrap() * scale).unwrap();
        tensors.insert(name.to_string(), t);
    };
    add("embeddings.word_embeddings.weight", &[64, hidden], 1.0);
    add("embeddings.position_embeddings.weight", &[80, hidden], 0.1);
    add("embeddings.token_type_embeddings.weight", &[2, hidden], 0.1);
    let p = "encoder.layer.0";
    let linears = [
        ("attention.self.query", hidden, hidden),
        ("attention.self.key", hidden, hidden),
        ("attention.self.value", hidden, hidden),
        ("attention.output.dense", hidden, hidden),
        ("intermediate.dense", intermediate, hidden),
        ("output.dense", hidden, intermediate),
    ];
    for (name, outputs, inputs) in linears {
        let scale = 1.0 / (inputs as f64).sqrt();
        add(&format!("{p}.{name}.weight"), &[outputs, inputs], scale);
        add(&format!("{p}.{name}.bias"), &[outputs], 0.1);
    }
    for norm in [
        "embeddings.LayerNorm".to_string(),
        format!("{p}.attention.output.LayerNorm"),
        format!("{p}.output.LayerNorm"),
    ] {
        add(&format!("{norm}.weight"), &[hidden], 0.1);
        add(&format!("{norm}.bias"), &[hidden], 0.1);
    }
    (tensors, config)
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb)
}

#[test]
fn auto_takes_f32_products_where_tiles_cannot_take_the_widths() {
    let (tensors, config) = random_model(48, 96);
    let bert = Bert::from_tensors(tensors.clone(), config.clone(), Matmul::Auto).unwrap();
    assert_eq!(bert.matmul(), Matmul::F32);
    let embedded = bert.embed(&[&[1, 5, 9, 2]], Pooling::Mean).unwrap();
    assert_eq!(embedded[0].len(), 48);

    // Asked for by name, AMX products refuse such a model, with the reason.
    for matmul in [Matmul::AmxBf16, Matmul::AmxBf16x3] {
        let err = Bert::from_tensors(tensors.clone(), config.clone(), matmul)
            .err()
            .expect("AMX products cannot take widths of 48");
        assert!(matches!(err, LoadError::Unsupported(_)), "{err}");
    }
}

#[test]
fn every_kind_of_product_embeds_a_model_of_other_widths_alike() {
    let (tensors, config) = random_model(64, 128);
    let auto = Bert::from_tensors(tensors.clone(), config.clone(), Matmul::Auto).unwrap();
    if !Matmul::amx_available() {
        assert_eq!(auto.matmul(), Matmul::F32);
        eprintln!("this CPU or kernel offers no AMX: AMX products not checked");
        return;
    }
    assert_eq!(auto.matmul(), Matmul::AmxBf16);
    // Batches whose token counts are below, at and above whole tile blocks.
    let inputs: Vec<Vec<u32>> = [3usize, 17, 32, 33, 70]
        .iter()
        .map(|&len| (0..len as u32).map(|i| (i * 7 + len as u32) % 64).collect())
        .collect();
    let batch: Vec<&[u32]> = inputs.iter().map(Vec::as_slice).collect();
    let f32 = Bert::from_tensors(tensors.clone(), config.clone(), Matmul::F32).unwrap();
    let want = f32.embed(&batch, Pooling::Mean).unwrap();
    for (matmul, least_cosine) in [(Matmul::AmxBf16x3, 0.99999), (Matmul::AmxBf16, 0.9999)] {
        let bert = Bert::from_tensors(tensors.clone(), config.clone(), matmul).unwrap();
        let got = bert.embed(&batch, Pooling::Mean).unwrap();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let c = cosine(g, w);
            assert!(c >= least_cosine, "{matmul:?}, input {i}: cosine {c}");
        }
    }
}

#[test]
fn every_matmul_name_reads_back_the_same_in_config_and_on_the_command_line() {
    for matmul in Matmul::ALL {
        let name = matmul.name();
        assert_eq!(name.parse::<Matmul>(), Ok(matmul));
        let from_config: Matmul = serde_json::from_str(&format!("\"{name}\"")).unwrap();
        assert_eq!(from_config, matmul);
    }
    let err = "amx".parse::<Matmul>().unwrap_err();
    assert!(err.contains("auto, f32, amx_bf16x3, amx_bf16"), "{err}");
}
