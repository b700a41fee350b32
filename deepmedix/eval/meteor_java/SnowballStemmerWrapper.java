package edu.cmu.meteor.aligner;

import java.util.HashMap;

import org.tartarus.snowball.SnowballStemmer;

/**
 * Drop-in replacement for meteor-1.5.jar's SnowballStemmerWrapper that remembers each word's stem. The Snowball
 * stemmer's result depends on the word only (setCurrent resets its state), so the stems are the jar's; a corpus
 * of reports repeats a few hundred words thousands of times, and stemming them again was a third of the time.
 */
public class SnowballStemmerWrapper implements Stemmer {

    private final SnowballStemmer stemmer;
    private final HashMap<String, String> stems = new HashMap<String, String>();

    public SnowballStemmerWrapper(SnowballStemmer stemmer) {
        this.stemmer = stemmer;
    }

    public synchronized String stem(String word) {
        String out = stems.get(word);
        if (out == null) {
            stemmer.setCurrent(word);
            stemmer.stem();
            out = stemmer.getCurrent();
            if (stems.size() < 1000000)
                stems.put(word, out);
        }
        return out;
    }
}
