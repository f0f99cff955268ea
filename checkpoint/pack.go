package checkpoint

import (
	"bytes"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"sync"

	"github.com/klauspost/compress/s2"
	"github.com/klauspost/compress/zstd"
)

// The pack: a checkpoint's CRIU images stored as chunks (format 2, issue 16).
//
//	<dir>/.chunks/                 chunks shared by the checkpoints of the container
//	  <2 hex>/<name>.<key id>      one chunk: header, then its payload (see sealChunk)
//	  <2 hex>/.tmp-…               a chunk being written
//
// Each image is cut into chunks of Pack.ChunkSize bytes (the last one shorter). A chunk of zeros
// is not stored. Any other is named by the HMAC-SHA256 of its plaintext under the chunk naming key
// (never a plain hash: a pod reading the chunk names on its volume must not be able to confirm a
// guess of its memory), compressed when that saves 10 % or more, and encrypted with AES-256-GCM
// under the data key of the checkpoint that first wrote it (fresh random nonce per chunk; the
// header, the chunk's name and its key's id are additional data). A chunk file is written under a
// temporary name, fsynced and renamed into place: never written in place, never replaced. Two
// checkpoints with equal chunks share the file, so a second checkpoint of a mostly unchanged heap
// writes only the chunks that changed. The manifest, signed by the agents' key, lists every
// chunk of every image (name, length, which data key), so what a reader returns is exactly what
// the agent dumped: each chunk is decrypted, decompressed and its HMAC checked before a byte of
// it is returned.

// chunksDir is the chunk store in a container's checkpoint directory: its leading dot keeps it
// out of List, PruneAt and ValidID.
const chunksDir = ".chunks"

// DefaultChunkSize: see the measurements in docs/agent.md ("Checkpoint store").
const DefaultChunkSize = 256 << 10

// maxChunkSize bounds what a manifest may ask a reader to allocate per chunk.
const maxChunkSize = 16 << 20

// Codec compresses chunks.
type Codec uint8

// Codecs. The byte is stored in each chunk's header; zero, in PackOptions, means DefaultCodec.
const (
	CodecS2   Codec = 1
	CodecZstd Codec = 2
	CodecRaw  Codec = 3 // stored as is
)

// DefaultCodec: see docs/agent.md ("Checkpoint store") for the measurement that chose it.
const DefaultCodec = CodecS2

func (c Codec) String() string {
	switch c {
	case CodecRaw:
		return "raw"
	case CodecS2:
		return "s2"
	case CodecZstd:
		return "zstd"
	}
	return fmt.Sprintf("codec(%d)", uint8(c))
}

// Pack lists a checkpoint's images stored as chunks (Manifest.Pack).
type Pack struct {
	ChunkSize int `json:"chunkSize"`
	// Keys are the wrapped data keys the chunks need: Keys[0] is this checkpoint's, the others
	// came with chunks reused from older checkpoints. Empty when the chunks are not encrypted.
	Keys   []WrappedKey  `json:"keys,omitempty"`
	Images []PackedImage `json:"images"`
	// Stored is the bytes on disk of every chunk the images reference; Written those this
	// checkpoint wrote itself (the rest it shares with older ones).
	Stored  int64 `json:"stored"`
	Written int64 `json:"written"`
}

// PackedImage is one CRIU image: its chunks in order (chunk i starts at the sum of the lengths of
// the chunks before it).
type PackedImage struct {
	Name   string     `json:"name"`
	Size   int64      `json:"size"`
	Chunks []ChunkRef `json:"chunks"`
}

// ChunkRef is one chunk of an image.
type ChunkRef struct {
	// Name is the hex HMAC of the plaintext; empty for a chunk of zeros (not stored).
	Name string `json:"n,omitempty"`
	Len  int    `json:"l"`
	// Key indexes Pack.Keys (the data key that encrypts the chunk); -1: not encrypted.
	Key int `json:"k,omitempty"`
	// Stored is the chunk file's size.
	Stored int64 `json:"s,omitempty"`
}

// file is the chunk's file below .chunks: "<2 hex>/<name>.<key id or plain>".
func (p *Pack) file(c ChunkRef) string { return chunkFile(c.Name, p.keyID(c.Key)) }

func (p *Pack) keyID(i int) string {
	if i < 0 || i >= len(p.Keys) {
		return plainID
	}
	return p.Keys[i].ID
}

const plainID = "plain"

func chunkFile(name, keyID string) string { return name[:2] + "/" + name + "." + keyID }

// validate checks what a reader relies on before touching a chunk file.
func (p *Pack) validate() error {
	if p.ChunkSize <= 0 || p.ChunkSize > maxChunkSize {
		return fmt.Errorf("pack: chunk size %d out of range", p.ChunkSize)
	}
	seen := map[string]bool{}
	for _, img := range p.Images {
		if err := checkImageName(img.Name); err != nil || seen[img.Name] {
			return fmt.Errorf("pack: image name %q invalid or repeated", img.Name)
		}
		seen[img.Name] = true
		var total int64
		for i, c := range img.Chunks {
			if c.Len <= 0 || c.Len > p.ChunkSize {
				return fmt.Errorf("pack: image %s chunk %d: length %d out of range", img.Name, i, c.Len)
			}
			if c.Name != "" && !validChunkName(c.Name) {
				return fmt.Errorf("pack: image %s chunk %d: name %q is not 64 hex digits", img.Name, i, c.Name)
			}
			if c.Name != "" && !p.keyOK(c.Key) {
				return fmt.Errorf("pack: image %s chunk %d: key %d out of range", img.Name, i, c.Key)
			}
			total += int64(c.Len)
		}
		if total != img.Size {
			return fmt.Errorf("pack: image %s: chunks hold %d bytes, size says %d", img.Name, total, img.Size)
		}
	}
	return nil
}

// keyOK: an encrypted pack names one of its keys, a plain one none.
func (p *Pack) keyOK(k int) bool {
	if len(p.Keys) == 0 {
		return k == -1
	}
	return k >= 0 && k < len(p.Keys)
}

func validChunkName(n string) bool {
	b, err := hex.DecodeString(n)
	return err == nil && len(b) == sha256.Size && hex.EncodeToString(b) == n
}

// checkImageName accepts a plain file name (CRIU's image names).
func checkImageName(n string) error {
	if n == "" || n == "." || n == ".." || len(n) > 255 || bytes.ContainsAny([]byte(n), "/\x00") {
		return fmt.Errorf("image name %q: not a plain file name", n)
	}
	return nil
}

// chunkName is the keyed hash naming a chunk.
func chunkName(key, plain []byte) string {
	mac := hmac.New(sha256.New, key)
	mac.Write(plain)
	return hex.EncodeToString(mac.Sum(nil))
}

func allZero(b []byte) bool {
	// Compare 4 KiB at a time against a zero page: memequal is vectorised.
	for len(b) >= len(zeroPage) {
		if !bytes.Equal(b[:len(zeroPage)], zeroPage[:]) {
			return false
		}
		b = b[len(zeroPage):]
	}
	return bytes.Equal(b, zeroPage[:len(b)])
}

var zeroPage [4096]byte

// The chunk file:
//
//	0  "STCK"    magic
//	4  1         version
//	5  codec     Codec of the payload
//	6  flags     1: encrypted
//	7  0         reserved
//	8  length    uint32 little endian: the plaintext's length
//	12 nonce     12 bytes, when encrypted
//	   payload   AES-256-GCM(data key, compressed plaintext, AD = header ‖ name ‖ key id), or
//	             the compressed plaintext itself when not encrypted
const (
	chunkMagic   = "STCK"
	chunkHdrLen  = 12
	flagEncrypt  = 1
	gcmNonceSize = 12
	gcmOverhead  = 16
)

// minSaving: a chunk is stored raw unless compression saves at least a tenth.
const minSaving = 10

var (
	zstdEnc  *zstd.Encoder
	zstdDec  *zstd.Decoder
	zstdOnce sync.Once
)

func zstdCodecs() (*zstd.Encoder, *zstd.Decoder) {
	zstdOnce.Do(func() {
		zstdEnc, _ = zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderConcurrency(1), zstd.WithLowerEncoderMem(true))
		zstdDec, _ = zstd.NewReader(nil, zstd.WithDecoderConcurrency(0), zstd.WithDecodeAllCapLimit(true), zstd.WithDecoderMaxWindow(maxChunkSize))
	})
	return zstdEnc, zstdDec
}

// compress appends plain compressed with c to dst, or plain itself with CodecRaw when that does
// not save minSaving %.
func compress(c Codec, dst, plain []byte) ([]byte, Codec) {
	start := len(dst)
	switch c {
	case CodecS2:
		need := s2.MaxEncodedLen(len(plain))
		if cap(dst)-start < need {
			dst = append(dst[:start:start], make([]byte, need)...)[:start]
		}
		enc := s2.Encode(dst[start:start+need], plain)
		dst = dst[:start+len(enc)]
	case CodecZstd:
		enc, _ := zstdCodecs()
		dst = enc.EncodeAll(plain, dst)
	default:
		return append(dst, plain...), CodecRaw
	}
	if len(dst)-start > len(plain)*(100-minSaving)/100 {
		return append(dst[:start], plain...), CodecRaw
	}
	return dst, c
}

// decompress decodes payload of codec c, which must give exactly n bytes.
func decompress(c Codec, payload []byte, n int) ([]byte, error) {
	switch c {
	case CodecRaw:
		if len(payload) != n {
			return nil, fmt.Errorf("raw payload of %d bytes, want %d", len(payload), n)
		}
		return payload, nil
	case CodecS2:
		if dl, err := s2.DecodedLen(payload); err != nil || dl != n {
			return nil, fmt.Errorf("s2 payload does not decode to %d bytes", n)
		}
		return s2.Decode(make([]byte, n), payload)
	case CodecZstd:
		_, dec := zstdCodecs()
		out, err := dec.DecodeAll(payload, make([]byte, 0, n))
		if err != nil || len(out) != n {
			return nil, errors.Join(err, fmt.Errorf("zstd payload does not decode to %d bytes", n))
		}
		return out, nil
	}
	return nil, fmt.Errorf("unknown codec %d", c)
}

func chunkAD(hdr []byte, name, keyID string) []byte {
	ad := make([]byte, 0, len(hdr)+len(name)+1+len(keyID))
	ad = append(ad, hdr...)
	ad = append(ad, name...)
	ad = append(ad, 0)
	return append(ad, keyID...)
}

// sealChunk builds the chunk file of plain (named name) into buf: compressed with c, encrypted
// with dk when dk is not nil.
func sealChunk(buf []byte, c Codec, dk *dataKey, name string, plain []byte) []byte {
	var hdr [chunkHdrLen]byte
	copy(hdr[:], chunkMagic)
	hdr[4] = 1
	binary.LittleEndian.PutUint32(hdr[8:], uint32(len(plain)))
	if dk == nil {
		out := append(buf[:0], hdr[:]...)
		out, used := compress(c, out, plain)
		out[5] = byte(used)
		return out
	}
	// Compress into a scratch area past the header and nonce, then seal in place.
	body := buf[:0]
	body = append(body, hdr[:]...)
	body = append(body, make([]byte, gcmNonceSize)...)
	comp, used := compress(c, body, plain)
	comp[5] = byte(used)
	comp[6] = flagEncrypt
	nonce := comp[chunkHdrLen : chunkHdrLen+gcmNonceSize]
	_, _ = rand.Read(nonce)
	ad := chunkAD(comp[:chunkHdrLen], name, dk.id)
	payload := comp[chunkHdrLen+gcmNonceSize:]
	sealed := dk.aead.Seal(payload[:0], nonce, payload, ad)
	return comp[:chunkHdrLen+gcmNonceSize+len(sealed)]
}

// openChunk checks and decodes a chunk file: decrypted with dk (nil: not encrypted),
// decompressed, and its HMAC under the naming key must be name. Only then is the plaintext
// returned.
func openChunk(file []byte, dk *dataKey, namingKey []byte, name string, n int) ([]byte, error) {
	if len(file) < chunkHdrLen || string(file[:4]) != chunkMagic || file[4] != 1 {
		return nil, errors.New("not a chunk file (bad header)")
	}
	if got := int(binary.LittleEndian.Uint32(file[8:])); got != n {
		return nil, fmt.Errorf("chunk holds %d bytes, the manifest says %d", got, n)
	}
	codec := Codec(file[5])
	payload := file[chunkHdrLen:]
	if enc := file[6]&flagEncrypt != 0; enc != (dk != nil) {
		return nil, errors.New("chunk encryption does not match the manifest")
	}
	if dk != nil {
		if len(payload) < gcmNonceSize+gcmOverhead {
			return nil, errors.New("chunk too short")
		}
		nonce, sealed := payload[:gcmNonceSize], payload[gcmNonceSize:]
		var err error
		payload, err = dk.aead.Open(sealed[:0:0], nonce, sealed, chunkAD(file[:chunkHdrLen], name, dk.id))
		if err != nil {
			return nil, errors.New("chunk fails authentication (altered, or another chunk)")
		}
	}
	plain, err := decompress(codec, payload, n)
	if err != nil {
		return nil, err
	}
	if !hmac.Equal([]byte(chunkName(namingKey, plain)), []byte(name)) {
		return nil, errors.New("chunk content does not match its name (altered)")
	}
	return plain, nil
}
