// Package demo is the learning half of `branchkey demo`: a small, real
// federated-learning workload in plain Go that the demo's simulated leaves run
// against an embedded server.
//
// # The learning setup
//
// Data: the UCI "Optical Recognition of Handwritten Digits" test set, 1797
// grayscale 8x8 images of the digits 0-9 with pixel values 0-16, embedded in
// the binary (see testdata/digits/README.md for source and licence).
// [LoadDigits] parses it and scales every pixel to [0, 1] by dividing by 16.
//
// Split: [SplitTrainTest] holds out a stratified test set (20%,
// [DefaultTestFraction]) that only the evaluator sees. [Partition] then deals
// the training set out to N leaves the way real federations look: the leaves'
// sizes are cut at random (with four leaves the largest is typically several
// times the smallest) and each digit is spread over the leaves in
// Dirichlet(alpha) proportions around those sizes, so with the demo's alpha of
// 0.5 ([DefaultAlpha]) most leaves see a few digits far more than the rest.
// Size skew is what makes the server's weighting of each update by its
// num_samples matter: an unweighted mean gives a leaf of 70 images, most of
// them three digits, as much say as one of 850 that has seen every digit. In
// the package's simulation with four leaves, weighting lifts test accuracy
// after the first round from about 72% to 89% (means over 50 seeds).
//
// Model: [Model] is a multilayer perceptron with one ReLU hidden layer and a
// softmax output, float32 throughout. Its parameters travel as an ordered list
// of row-major [Tensor] values, W1 (64, H), b1 (H), W2 (H, 10), b2 (10), which
// is what a leaf uploads and what [ModelFromTensors] loads back from the
// aggregate.
//
// Training: [Train] runs mini-batch SGD on the cross-entropy loss and
// [Evaluate] reports accuracy and mean loss. One federated round is: every
// leaf loads the global model, trains [DefaultEpochs] local epochs on its own
// shard, and uploads the result with its sample count; the server replaces the
// global model by the num_samples-weighted mean of the uploads (FedAvg). With
// the defaults, four leaves reach about 96% test accuracy in five rounds;
// local training costs about 3 µs per sample per epoch on one core, so a
// four-leaf round is some 20 ms of CPU.
//
// # Seeds
//
// Everything random takes an explicit seed or *rand.Rand (math/rand/v2); no
// function reads a global source, the clock or the environment, and training
// runs on a single goroutine. So the same seeds give the same split, the same
// partition, the same initial weights and bit-identical trained weights on
// the same Go toolchain, architecture and build settings. (math/rand/v2 fixes
// the PCG generator's output, but not how Rand methods such as Shuffle consume
// it, and the compiler fuses multiply-adds on some targets, such as arm64 or
// GOAMD64=v3, so bit-identical results are not promised across Go releases or
// targets.) The demo derives each
// leaf's training source from one run seed, for example
// rand.New(rand.NewPCG(seed, uint64(leafIndex))).
package demo
