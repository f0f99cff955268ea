package checkpoint

import (
	"fmt"
	"testing"
	"time"
)

// The measurements behind DefaultCodec, DefaultChunkSize and encryption by default
// (docs/agent.md, "Checkpoint store"). Run:
//
//	go test -run '^$' -bench 'Pack' -benchtime 3x ./checkpoint/
//
// BenchmarkPackSeal is one core's work per chunk (zero check, HMAC, compression, encryption);
// BenchmarkPackWrite the whole writer (workers, chunk files written and fdatasynced on the test's
// disk, commit); BenchmarkPackRead the reader (decrypt, decompress, HMAC) from the page cache.
// Each reports MB/s of image bytes and ratio = bytes on disk / image bytes.

const benchHeap = 64 << 20

var benchHeaps = map[string]func(int, uint64) []byte{"random": randomHeap, "json": jsonHeap}

func benchCases(f func(b *testing.B, heap []byte, opt PackOptions)) func(b *testing.B) {
	return func(b *testing.B) {
		for _, hn := range []string{"random", "json"} {
			heap := benchHeaps[hn](benchHeap, 1)
			for _, codec := range []Codec{CodecS2, CodecZstd, CodecRaw} {
				for _, plain := range []bool{false, true} {
					for _, cs := range []int{64 << 10, 256 << 10, 1 << 20} {
						opt := PackOptions{Codec: codec, Plain: plain, ChunkSize: cs}
						name := fmt.Sprintf("%s/%s/encrypt=%v/chunk=%dK", hn, codec, !plain, cs>>10)
						b.Run(name, func(b *testing.B) { f(b, heap, opt) })
					}
				}
			}
		}
	}
}

func BenchmarkPackSeal(b *testing.B) {
	benchCases(func(b *testing.B, heap []byte, opt PackOptions) {
		ring := testRing(b)
		var dk *dataKey
		if !opt.Plain {
			dk, _, _ = ring.newDataKey("ns")
		}
		buf := make([]byte, 0, 2*opt.ChunkSize+1024)
		b.SetBytes(int64(len(heap)))
		var stored int64
		for b.Loop() {
			stored = 0
			for off := 0; off < len(heap); off += opt.ChunkSize {
				c := heap[off:min(off+opt.ChunkSize, len(heap))]
				if allZero(c) {
					continue
				}
				name := chunkName(ring.naming, c)
				stored += int64(len(sealChunk(buf, opt.Codec, dk, name, c)))
			}
		}
		b.ReportMetric(float64(stored)/float64(len(heap)), "ratio")
	})(b)
}

func BenchmarkPackWrite(b *testing.B) {
	benchCases(func(b *testing.B, heap []byte, opt PackOptions) {
		b.SetBytes(int64(len(heap)))
		var stored int64
		for b.Loop() {
			dir := b.TempDir()
			ckpt, err := packCheckpoint(b, dir, time.Now(), opt, map[string][]byte{"pages-1.img": heap})
			if err != nil {
				b.Fatal(err)
			}
			m, _ := ReadManifest(ckpt)
			stored = m.Pack.Stored
		}
		b.ReportMetric(float64(stored)/float64(len(heap)), "ratio")
	})(b)
}

func BenchmarkPackRead(b *testing.B) {
	benchCases(func(b *testing.B, heap []byte, opt PackOptions) {
		ckpt, err := packCheckpoint(b, b.TempDir(), time.Now(), opt, map[string][]byte{"pages-1.img": heap})
		if err != nil {
			b.Fatal(err)
		}
		_, r := openPacked(b, ckpt)
		b.SetBytes(int64(len(heap)))
		for b.Loop() {
			got, err := readAllImage(r, "pages-1.img")
			if err != nil || len(got) != len(heap) {
				b.Fatal(err, len(got))
			}
		}
	})(b)
}
