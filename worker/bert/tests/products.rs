//! Which products a model gets (`Matmul`), on small random BERT models whose
//! widths AMX tiles and AVX512_BF16 registers can or cannot take.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use jetinfer_bert::{Bert, Config, Cpu, LoadError, Matmul, Pooling};

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
        model_type: None,
        pad_token_id: None,
        relative_attention_num_buckets: None,
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

/// Skips (saying so) where the CPU lacks AVX512_BF16, unless
/// `JETINFER_REQUIRE_AVX512_BF16=1` says this machine must have it.
fn avx512_bf16_runs_here() -> bool {
    if Matmul::avx512_bf16_available() {
        return true;
    }
    assert!(
        std::env::var("JETINFER_REQUIRE_AVX512_BF16").as_deref() != Ok("1"),
        "JETINFER_REQUIRE_AVX512_BF16=1 but this CPU offers no AVX512_BF16"
    );
    eprintln!("this CPU offers no AVX512_BF16: avx512_bf16 products not checked");
    false
}

#[test]
fn auto_takes_f32_products_where_no_bf16_products_can_take_the_widths() {
    // 40 columns: neither AMX tiles (32) nor 16-lane registers divide it.
    let (tensors, config) = random_model(40, 80);
    let bert = Bert::from_tensors(tensors.clone(), config.clone(), Matmul::Auto).unwrap();
    assert_eq!(bert.matmul(), Matmul::F32);
    let embedded = bert.embed(&[&[1, 5, 9, 2]], Pooling::Mean).unwrap();
    assert_eq!(embedded[0].len(), 40);

    // Asked for by name, bf16 products refuse such a model, with the reason.
    for matmul in [Matmul::AmxBf16, Matmul::AmxBf16x3, Matmul::Avx512Bf16] {
        let err = Bert::from_tensors(tensors.clone(), config.clone(), matmul)
            .err()
            .expect("bf16 products cannot take widths of 40");
        assert!(matches!(err, LoadError::Unsupported(_)), "{err}");
    }
}

#[test]
fn auto_takes_amx_bf16_then_avx512_bf16_on_amd_only_else_f32() {
    let cpu = |amx, avx512_bf16, amd| Cpu {
        amx,
        avx512_bf16,
        amd,
    };
    let any = |_: Matmul| true;
    // Sapphire Rapids and later with AMX granted, and any CPU with AMX.
    assert_eq!(cpu(true, true, false).auto(any), Matmul::AmxBf16);
    // AMD Zen 4 and 5: vdpbf16ps outruns the f32 FMAs.
    assert_eq!(cpu(false, true, true).auto(any), Matmul::Avx512Bf16);
    // Intel without AMX (Cooper Lake, or AMX hidden by a hypervisor): one
    // vdpbf16ps a cycle against two f32 FMAs, so f32.
    assert_eq!(cpu(false, true, false).auto(any), Matmul::F32);
    // AVX2 or AVX-512 without BF16.
    assert_eq!(cpu(false, false, true).auto(any), Matmul::F32);
    assert_eq!(cpu(false, false, false).auto(any), Matmul::F32);
    // Widths the tiles do not take fall to the next kind that fits.
    let no_tiles = |m: Matmul| m != Matmul::AmxBf16;
    assert_eq!(cpu(true, true, true).auto(no_tiles), Matmul::Avx512Bf16);
    assert_eq!(cpu(true, true, false).auto(no_tiles), Matmul::F32);
    // A model held to f32 accuracy (a classifier, MPNet) never gets bf16.
    let exact = |m: Matmul| !m.rounds_to_bf16();
    assert_eq!(cpu(true, true, true).auto(exact), Matmul::F32);
}

#[test]
fn a_model_loaded_with_auto_runs_the_products_this_cpu_is_given() {
    let cpu = Cpu::this();
    eprintln!("this CPU: {cpu:?}");
    // 48 columns: whole registers of 16, not whole tiles of 32.
    let (tensors, config) = random_model(48, 96);
    let bert = Bert::from_tensors(tensors, config, Matmul::Auto).unwrap();
    assert_eq!(bert.matmul(), cpu.auto(|m| m != Matmul::AmxBf16));
    let (tensors, config) = random_model(64, 128);
    let bert = Bert::from_tensors(tensors, config, Matmul::Auto).unwrap();
    assert_eq!(bert.matmul(), cpu.auto(|_| true));
    let embedded = bert.embed(&[&[1, 5, 9, 2]], Pooling::Mean).unwrap();
    assert_eq!(embedded[0].len(), 64);
}

#[test]
fn asking_for_products_the_cpu_lacks_fails_to_load_with_the_reason() {
    let (tensors, config) = random_model(64, 128);
    for matmul in [Matmul::AmxBf16, Matmul::Avx512Bf16] {
        if matmul.available() {
            continue;
        }
        let err = Bert::from_tensors(tensors.clone(), config.clone(), matmul)
            .err()
            .expect("products this CPU lacks do not load");
        assert!(err.to_string().contains("offers no"), "{err}");
    }
}

#[test]
fn every_kind_of_product_embeds_a_model_of_other_widths_alike() {
    let (tensors, config) = random_model(64, 128);
    let mut kinds = Vec::new();
    if Matmul::amx_available() {
        kinds.push((Matmul::AmxBf16x3, 0.99999));
        kinds.push((Matmul::AmxBf16, 0.9999));
    } else {
        eprintln!("this CPU or kernel offers no AMX: AMX products not checked");
    }
    if avx512_bf16_runs_here() {
        // The arithmetic of `AmxBf16`, so the same bound.
        kinds.push((Matmul::Avx512Bf16, 0.9999));
    }
    // Batches whose token counts are below, at and above whole tile blocks.
    let inputs: Vec<Vec<u32>> = [3usize, 17, 32, 33, 70]
        .iter()
        .map(|&len| (0..len as u32).map(|i| (i * 7 + len as u32) % 64).collect())
        .collect();
    let batch: Vec<&[u32]> = inputs.iter().map(Vec::as_slice).collect();
    let f32 = Bert::from_tensors(tensors.clone(), config.clone(), Matmul::F32).unwrap();
    let want = f32.embed(&batch, Pooling::Mean).unwrap();
    for (matmul, least_cosine) in kinds {
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
    assert!(
        err.contains("auto, f32, amx_bf16x3, amx_bf16, avx512_bf16"),
        "{err}"
    );
}
